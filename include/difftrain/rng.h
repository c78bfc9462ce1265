// Seeds for every random stream of a run, derived from (run.seed, purpose, rank) with splitmix64
// (Steele, Lea and Flood 2014), so that no stream depends on the order in which other code draws:
// turning EMA on, or a sample grid, consumes nothing from the dropout or the noise streams.
#pragma once

#include <cstdint>

namespace difftrain {

// One splitmix64 output for state x: the finaliser applied to x + 0x9E3779B97F4A7C15.
uint64_t splitmix64(uint64_t x);

// Seed number `stream` of `seed`: splitmix64(seed + γ·stream), made a non-negative int64 as torch
// seeds are. Different streams never share a seed in practice (a 63-bit hash).
uint64_t derive_seed(uint64_t seed, uint64_t stream);

// What a generator draws; each purpose has its own streams.
enum class SeedPurpose {
  init,          // the initial weights: run.seed itself (as torch.manual_seed(seed) before building), the same on every rank
  dropout,       // the device's default generator (dropout) on rank r: stream r
  global_batch,  // t, ε and the class dropout of the global batch, shared by every rank: stream 2^32
};
uint64_t stream_seed(uint64_t seed, SeedPurpose purpose, int64_t rank = 0);

}  // namespace difftrain
