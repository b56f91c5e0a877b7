// Charts as PNG files drawn by gnuplot (Debian's gnuplot-nox): each chart is a
// self-contained gnuplot script (data inline) written next to its PNG, so a
// person can restyle it, then run. Used by moe-sweep and moe-report.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace fmoe::launch {

struct Series {
  std::string title;
  std::vector<std::pair<double, double>> points;
  bool highlight = false;  // drawn bold and in colour; the others thin and grey when any series is highlighted
};

struct Chart {
  std::string title, xlabel, ylabel;
  bool log_x = false, log_y = false;
  bool points_only = false;  // a scatter plot
  std::vector<std::string> xtics;  // categorical x labels (scatter over a choice axis): x is the index
};

// Throws a one-line error when gnuplot is not installed.
void require_gnuplot();

// Writes png_path's script (png_path with .gp) and runs gnuplot on it.
void draw_lines(const std::string& png_path, const Chart& chart, const std::vector<Series>& series);

// rows x columns of values (NaN: no data), rows labelled, columns at x positions.
void draw_heatmap(const std::string& png_path, const Chart& chart, const std::vector<std::string>& row_labels,
                  const std::vector<double>& x, const std::vector<std::vector<double>>& values);

}  // namespace fmoe::launch
