"""Model building blocks; every parameter carries a ``weight_loader`` that shards it."""
