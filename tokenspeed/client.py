"""ScoringClient: the Python side of `tokenspeed serve`, mirroring Engine's calls.

    client = ScoringClient("http://127.0.0.1:30010", api_key=None)
    out = client.score(sequences, temperature=1.0, return_entropy=True)

Errors come back as the engine raised them: a bad sequence as InvalidSequenceError
(same message, .index and .field), a bad option as ValueError; a server failure as
RuntimeError. Needs httpx (pip install 'tokenspeed[server]'). One client may be shared
by threads.
"""
from __future__ import annotations

import json
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .inputs import InvalidSequenceError


def _jsonable(value: Any) -> Any:
    """Ids as the engine takes them (1-D integer tensors, numpy integers) as JSON."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, numbers.Integral):
        return int(value)
    if hasattr(value, "tolist"):  # numpy arrays
        return value.tolist()
    raise TypeError(f"{type(value).__name__} cannot be sent as JSON")


def _padded(rows: list[list], dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(len(rows), max((len(r) for r in rows), default=0), dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=dtype)
    return out


class ScoringClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float | None = None):
        import httpx
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        content = None if body is None else json.dumps(body, default=_jsonable)
        response = self._http.request(method, path, content=content,
                                      headers={"Content-Type": "application/json"})
        try:
            payload = response.json()
        except ValueError:
            payload = {"error": response.text}
        if response.status_code == 200:
            return payload
        message = payload.get("error", response.text) if isinstance(payload, dict) else payload
        if response.status_code == 400:
            if "index" in payload:
                raise InvalidSequenceError(payload["index"], payload["field"], payload["detail"])
            raise ValueError(message)
        if response.status_code == 401:
            raise PermissionError(message)
        if response.status_code == 413:
            raise ValueError(message)
        raise RuntimeError(f"{path}: the server answered {response.status_code}: {message}")

    def score(self, sequences: Sequence[Mapping[str, Any]], temperature: float = 1.0, *,
              return_tensors: bool = False, **options: Any) -> dict[str, Any]:
        """Engine.compute_log_probs over HTTP; also returns ``weight_version``, the weights
        the whole request was scored with. Options pass through to the engine."""
        out = self._call("POST", "/v1/score", {"sequences": list(sequences),
                                               "temperature": temperature, **options})
        if return_tensors:
            lengths = torch.tensor([len(t) for t in out["tokens"]], dtype=torch.int64)
            width = int(lengths.max()) if len(lengths) else 0
            out["mask"] = torch.arange(width) < lengths.view(-1, 1)
            out["tokens"] = _padded(out["tokens"], torch.int64)
            for key in ("log_probs", "entropy"):
                if key in out:
                    out[key] = _padded(out[key], torch.float32)
        return out

    def update_weights_from_disk(self, model_path: str) -> int:
        """Load a checkpoint folder's weights (same names, shapes and dtypes) on the server;
        returns the new weight_version."""
        return self._call("POST", "/v1/update_weights_from_disk",
                          {"model_path": str(model_path)})["weight_version"]

    def flush_cache(self) -> None:
        self._call("POST", "/v1/flush_cache", {})

    def model(self) -> dict[str, Any]:
        """Architecture, vocab_size, dtype, tp_size, weight_version and the engine's stats."""
        return self._call("GET", "/v1/model")

    def healthy(self) -> bool:
        return self._http.get("/health").status_code == 200

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ScoringClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
