// Unit tests of csrc/cuda/tile_plan.h, the tiling of the CUDA loss kernel, without a GPU: every
// plan fits its shared-memory budget, the tiles partition the plane, and each tile's staged
// regions hold what its three phases read. Same output convention as test_stencil.cpp.
#include "../../csrc/cuda/tile_plan.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

using hgloss::cuda::TileGeometry;
using hgloss::cuda::TilePlan;

int passed = 0;
int failed = 0;

void check(bool ok, const std::string& name) {
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", name.c_str());
  (ok ? passed : failed) += 1;
}

// The budgets plan_heatmap_loss derives from an H100 (227 KiB per block, 228 KiB per
// multiprocessor) and an A100 (163 and 164 KiB), less its 2 KiB reserve.
struct Budget {
  const char* device;
  int64_t whole_plane_bytes, tile_bytes;
};
const Budget kBudgets[] = {{"h100", 233472 / 3 - 2048, 233472 / 6 - 2048}, {"a100", 167936 / 3 - 2048, 167936 / 6 - 2048}};

std::string name_of(const Budget& budget, int64_t height, int64_t width, int64_t value_bytes) {
  return std::string(budget.device) + " " + std::to_string(height) + "x" + std::to_string(width) + " " +
         std::to_string(8 * value_bytes) + "-bit";
}

void test_plan(const Budget& budget, int64_t height, int64_t width, int64_t value_bytes) {
  const std::string name = name_of(budget, height, width, value_bytes);
  const TilePlan plan = hgloss::cuda::plan_tiles(height, width, value_bytes, budget.whole_plane_bytes, budget.tile_bytes);
  const int64_t limit = plan.whole_plane() ? budget.whole_plane_bytes : budget.tile_bytes;
  check(plan.shared_bytes <= limit, name + ": fits its budget");
  check(plan.tiles_down * plan.tile_rows >= height && (plan.tiles_down - 1) * plan.tile_rows < height &&
            plan.tiles_across * plan.tile_cols >= width && (plan.tiles_across - 1) * plan.tile_cols < width,
        name + ": tile grid covers the plane exactly");

  std::vector<int> owners(static_cast<size_t>(height * width), 0);
  bool regions_fit = true, halo_staged = true;
  for (int64_t tile = 0; tile < plan.tiles(); ++tile) {
    const TileGeometry g(plan, tile, height, width);
    regions_fit = regions_fit && g.rows >= 1 && g.cols >= 1 && g.diff_rows <= plan.diff_rows &&
                  g.diff_cols <= plan.diff_cols && g.map_rows <= plan.map_rows && g.map_cols <= plan.map_cols;
    for (int64_t i = g.row0; i < g.row0 + g.rows; ++i) {
      for (int64_t j = g.col0; j < g.col0 + g.cols; ++j) owners[static_cast<size_t>(i * width + j)] += 1;
    }
    // Phase 2 reads D within 2 pixels of the tile: it must be staged wherever that is in the plane.
    for (int64_t i = std::max<int64_t>(0, g.row0 - 2); i < std::min(height, g.row0 + g.rows + 2); ++i) {
      for (int64_t j = std::max<int64_t>(0, g.col0 - 2); j < std::min(width, g.col0 + g.cols + 2); ++j) {
        const bool staged = i >= g.diff_row0 && i < g.diff_row0 + g.diff_rows && j >= g.diff_col0 &&
                            j < g.diff_col0 + g.diff_cols;
        halo_staged = halo_staged && staged;
      }
    }
  }
  bool partition = true;
  for (int owner_count : owners) partition = partition && owner_count == 1;
  check(partition, name + ": every pixel belongs to exactly one tile");
  check(regions_fit, name + ": every tile's regions fit the plan's");
  check(halo_staged, name + ": every tile stages D within 2 pixels of it");
}

void test_known_plans() {
  const Budget& h100 = kBudgets[0];
  const TilePlan coco = hgloss::cuda::plan_tiles(64, 48, 4, h100.whole_plane_bytes, h100.tile_bytes);
  check(coco.whole_plane() && coco.diff_rows == 64 && coco.diff_cols == 48 && coco.map_rows == 66 &&
            coco.map_cols == 50 && coco.shared_bytes == (64 * 48 + 2 * 66 * 50) * 4,
        "COCO 64x48 float32 is staged whole");
  check(hgloss::cuda::plan_tiles(64, 64, 4, h100.whole_plane_bytes, h100.tile_bytes).whole_plane(),
        "MPII 64x64 float32 is staged whole");
  check(!hgloss::cuda::plan_tiles(256, 256, 4, h100.whole_plane_bytes, h100.tile_bytes).whole_plane(),
        "256x256 float32 is tiled");
  const TilePlan row = hgloss::cuda::plan_tiles(1, 9000, 4, h100.whole_plane_bytes, h100.tile_bytes);
  check(!row.whole_plane() && row.tile_rows == 1 && row.diff_rows == 1, "1x9000 gets tiles one pixel high");
  const TilePlan column = hgloss::cuda::plan_tiles(9000, 1, 4, h100.whole_plane_bytes, h100.tile_bytes);
  check(!column.whole_plane() && column.tile_cols == 1 && column.diff_cols == 1, "9000x1 gets tiles one pixel wide");
}

}  // namespace

int main() {
  test_known_plans();
  const int64_t sizes[] = {1, 2, 3, 5, 48, 64, 97, 300, 1024, 9000};
  for (const Budget& budget : kBudgets) {
    for (int64_t height : sizes) {
      for (int64_t width : sizes) {
        if (height * width > 2000000) continue;
        for (int64_t value_bytes : {4, 8}) test_plan(budget, height, width, value_bytes);
      }
    }
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
