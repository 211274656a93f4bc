// How the CUDA loss kernel cuts planes into tiles, from the plane size and the device's
// shared-memory limits. Free of CUDA and torch, so the C++ unit tests check it without a GPU.
#pragma once

#include <algorithm>
#include <cstdint>

#include "hgloss/stencil.h"  // HGLOSS_HOST_DEVICE

namespace hgloss {
namespace cuda {

// The gradient at a pixel reads Ax and Ay up to 1 pixel away, and those read D up to 1 pixel
// further: a tile stages D with a halo of 2 and the maps with a ring of 1.
constexpr int64_t kDiffHalo = 2;
constexpr int64_t kMapRing = 1;

// Each block of the loss kernel owns one tile of one plane; the tiles of a plane form a
// tiles_down x tiles_across grid, the last row and column of tiles possibly smaller.
struct TilePlan {
  int64_t tile_rows = 0, tile_cols = 0;
  int64_t tiles_down = 0, tiles_across = 0;
  // The largest staged regions of any tile: D over the tile and its halo (clipped to the plane),
  // and Ax, Ay over the tile and its ring (not clipped: the ring outside the plane holds zeros).
  int64_t diff_rows = 0, diff_cols = 0;
  int64_t map_rows = 0, map_cols = 0;
  int64_t shared_bytes = 0;

  HGLOSS_HOST_DEVICE int64_t tiles() const { return tiles_down * tiles_across; }
  HGLOSS_HOST_DEVICE bool whole_plane() const { return tiles() == 1; }
};

inline TilePlan tile_plan_for(int64_t height, int64_t width, int64_t tile_rows, int64_t tile_cols,
                              int64_t value_bytes) {
  TilePlan plan;
  plan.tile_rows = tile_rows;
  plan.tile_cols = tile_cols;
  plan.tiles_down = (height + tile_rows - 1) / tile_rows;
  plan.tiles_across = (width + tile_cols - 1) / tile_cols;
  const bool whole = plan.whole_plane();
  plan.diff_rows = whole ? height : std::min(height, tile_rows + 2 * kDiffHalo);
  plan.diff_cols = whole ? width : std::min(width, tile_cols + 2 * kDiffHalo);
  plan.map_rows = tile_rows + 2 * kMapRing;
  plan.map_cols = tile_cols + 2 * kMapRing;
  plan.shared_bytes = (plan.diff_rows * plan.diff_cols + 2 * plan.map_rows * plan.map_cols) * value_bytes;
  return plan;
}

// A plane whose D, Ax and Ay fit in `whole_plane_bytes` is staged whole by one block (COCO's
// 64x48 and MPII's 64x64 in float32). Larger planes are cut into tiles of about 2048 pixels,
// halved along their longer side until they fit in `tile_bytes`; a plane one pixel high or wide
// gets tiles one pixel high or wide.
inline TilePlan plan_tiles(int64_t height, int64_t width, int64_t value_bytes, int64_t whole_plane_bytes,
                           int64_t tile_bytes) {
  const TilePlan whole = tile_plan_for(height, width, height, width, value_bytes);
  if (whole.shared_bytes <= whole_plane_bytes) return whole;
  constexpr int64_t kTilePixels = 2048;
  int64_t cols = std::min<int64_t>(width, 128);
  int64_t rows = std::min<int64_t>(height, std::max<int64_t>(1, kTilePixels / cols));
  if (rows == height) cols = std::min<int64_t>(width, std::max<int64_t>(cols, kTilePixels / rows));
  TilePlan plan = tile_plan_for(height, width, rows, cols, value_bytes);
  while (plan.shared_bytes > tile_bytes && rows * cols > 1) {
    if (rows >= cols && rows > 1) {
      rows = (rows + 1) / 2;
    } else {
      cols = (cols + 1) / 2;
    }
    plan = tile_plan_for(height, width, rows, cols, value_bytes);
  }
  return plan;
}

// The tile a block owns, and where its staged regions sit in plane coordinates.
struct TileGeometry {
  int64_t row0, col0;            // first pixel of the tile
  int rows, cols;                // the tile, clipped to the plane
  int64_t diff_row0, diff_col0;  // first pixel of the staged D
  int diff_rows, diff_cols;      // the staged D: the tile and its halo, clipped to the plane
  int map_rows, map_cols;        // the staged maps: the tile and its ring, from (row0-1, col0-1)

  HGLOSS_HOST_DEVICE TileGeometry(const TilePlan& plan, int64_t tile, int64_t height, int64_t width) {
    row0 = (tile / plan.tiles_across) * plan.tile_rows;
    col0 = (tile % plan.tiles_across) * plan.tile_cols;
    rows = static_cast<int>(smaller(plan.tile_rows, height - row0));
    cols = static_cast<int>(smaller(plan.tile_cols, width - col0));
    diff_row0 = larger(row0 - kDiffHalo, 0);
    diff_col0 = larger(col0 - kDiffHalo, 0);
    diff_rows = static_cast<int>(smaller(row0 + rows + kDiffHalo, height) - diff_row0);
    diff_cols = static_cast<int>(smaller(col0 + cols + kDiffHalo, width) - diff_col0);
    map_rows = rows + 2 * static_cast<int>(kMapRing);
    map_cols = cols + 2 * static_cast<int>(kMapRing);
  }

 private:
  HGLOSS_HOST_DEVICE static int64_t smaller(int64_t a, int64_t b) { return a < b ? a : b; }
  HGLOSS_HOST_DEVICE static int64_t larger(int64_t a, int64_t b) { return a > b ? a : b; }
};

}  // namespace cuda
}  // namespace hgloss
