#include "difftrain/rng.h"

namespace difftrain {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t derive_seed(uint64_t seed, uint64_t stream) {
  return splitmix64(seed + 0x9E3779B97F4A7C15ull * stream) & ((uint64_t{1} << 63) - 1);
}

uint64_t stream_seed(uint64_t seed, SeedPurpose purpose, int64_t rank) {
  switch (purpose) {
    case SeedPurpose::init: return seed;
    case SeedPurpose::dropout: return derive_seed(seed, static_cast<uint64_t>(rank));
    case SeedPurpose::global_batch: return derive_seed(seed, uint64_t{1} << 32);  // a stream beyond any rank
  }
  return seed;
}

}  // namespace difftrain
