// Exact O(1) sampling of the uniform-state latent z = argmax_j w_j of the
// Gaussian latent w = a~ onehot(x) + s~ eps (docs/math.md §2a, §2b).
//
// Dividing w by s~ leaves the argmax unchanged: w/s~ = nu onehot(x) + eps with
// nu = a~/s~ = exp(-gamma/2). Only three numbers per token decide the argmax:
//   eps_x ~ N(0,1)                      the clean token's noise
//   M     = max of the K-1 other noises = -Phi^-1(1 - U^(1/(K-1))), U ~ U(0,1)
//           (upper-tail form: 1 - U^(1/(K-1)) = -expm1(log(U)/(K-1)), exact
//           even where U^(1/(K-1)) rounds to 1)
//   j*    = who holds M: uniform over the K-1 ids != x
//   z     = x if nu + eps_x > M else j*
// A coupled pair (z_t, z_s) shares (eps_x, M, j*), which is exactly the joint
// law of argmaxes of w_t, w_s built from the same eps.
//
// Random numbers: two Philox blocks per token at positions offset, offset + 1
// of stream `token` (philox.h): block 0 -> eps_x (Box-Muller), block 1 -> U
// (53 bits) and the index of j* (64 bits). Every output is a pure function of
// (seed, offset, token, x, gamma): identical on CPU (any thread count),
// emulated CUDA and CUDA, except where nu + eps_x and M tie to rounding.
#pragma once

#include <cmath>
#include <cstdint>

#include "duo_fast/common.h"
#include "duo_fast/philox.h"
#include "duo_fast/random.h"
#include "duo_fast/special.h"

namespace duo_fast {
namespace latent {

constexpr uint64_t kBlocksPerToken = 2;  // generator offset advance per call

// Max of n iid N(0,1) from a uniform u in (0,1).
DUO_HD double max_of_normals(double u, double n) { return -ndtri(-expm1(log(u) / n)); }

struct Draw {
  double eps_x;   // noise on the clean token
  double m;       // max of the other K-1 noises
  int64_t other;  // j*: the id != x holding m
};

DUO_HD Draw draw(uint64_t seed, uint64_t offset, uint64_t token, int64_t x, int64_t vocab_size) {
  const Philox4x32 b0 = philox_block(seed, token, offset);
  const Philox4x32 b1 = philox_block(seed, token, offset + 1);
  Draw d;
  d.eps_x = normal2(b0).a;
  d.m = max_of_normals(uniform53(b1.v[0], b1.v[1]), double(vocab_size - 1));
  const int64_t r = int64_t(uniform_index(b1.v[2], b1.v[3], uint32_t(vocab_size - 1)));
  d.other = r + (r >= x ? 1 : 0);  // skip x: uniform over the K-1 others
  return d;
}

// z for one Gaussian level gamma (nu = exp(-gamma/2); gamma = -inf gives x).
DUO_HD int64_t select(const Draw& d, int64_t x, double gamma) {
  return exp(-0.5 * gamma) + d.eps_x > d.m ? x : d.other;
}

}  // namespace latent
}  // namespace duo_fast
