/*
 * Paged causal GQA prefill attention: the kernels of paged_prefill_attention, one header
 * each. The host picks one per call (attention_host.cpp); attention.cu launches them.
 *
 *   attention_wgmma.cuh   bf16/fp16, head dim 64 or 128, sm_90 device and sm_90a code in
 *                         the build: warp-specialised wgmma, persistent
 *   attention_mma.cuh     bf16/fp16, head dim 64 or 128, any sm_80+ device: mma.sync
 *   attention_simple.cuh  fp32 and other head dims: one warp per (token, query head)
 *
 * All three fuse Q K^T, the causal mask, an fp32 online softmax and P V, and write only
 * the normalised output. Their shared pieces: attention_tile.cuh (a tile of packed query
 * rows over the paged K/V cache: page arithmetic, Q and K/V gathers, output store) and
 * attention_softmax.cuh (the tiled kernels' online softmax); the wgmma kernel's roles,
 * scheduler and named barriers live in attention_wgmma_*.cuh.
 */
#pragma once

#include "cuda/attention_mma.cuh"
#include "cuda/attention_simple.cuh"
#include "cuda/attention_wgmma.cuh"
