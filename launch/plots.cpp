#include "launch/plots.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <sstream>
#include <stdexcept>

#include "common/file_util.h"

namespace fmoe::launch {
namespace fs = std::filesystem;
namespace {

std::string quoted(const std::string& text) {
  std::string out = "\"";
  for (char c : text) out += (c == '"' || c == '\\') ? std::string("\\") + c : std::string(1, c);
  return out + "\"";
}

std::string preamble(const std::string& png_path, const Chart& chart) {
  std::ostringstream gp;
  gp << "set terminal pngcairo size 1000,600 font 'Sans,10'\n"
     << "set output " << quoted(fs::path(png_path).filename().string()) << "\n"
     << "set title " << quoted(chart.title) << "\nset xlabel " << quoted(chart.xlabel) << "\nset ylabel " << quoted(chart.ylabel) << "\n"
     << "set termoption noenhanced\nset grid\nset key outside right top\n";
  if (chart.log_x) gp << "set logscale x\n";
  if (chart.log_y) gp << "set logscale y\n";
  if (!chart.xtics.empty()) {
    gp << "set xtics (";
    for (size_t i = 0; i < chart.xtics.size(); ++i) gp << (i ? ", " : "") << quoted(chart.xtics[i]) << " " << i;
    gp << ")\nset xrange [-0.5:" << chart.xtics.size() - 0.5 << "]\n";
  }
  return gp.str();
}

void run_gnuplot(const std::string& png_path, const std::string& script) {
  const fs::path gp_path = fs::path(png_path).replace_extension(".gp");
  common::write_file_atomic(gp_path.string(), script);
  // gnuplot writes the PNG relative to the script's folder.
  const std::string command = "cd " + quoted(fs::absolute(gp_path).parent_path().string()) + " && gnuplot " +
                              quoted(gp_path.filename().string()) + " 2> " + quoted(gp_path.filename().string() + ".log");
  if (std::system(command.c_str()) != 0) {
    throw std::runtime_error(gp_path.string() + ": gnuplot failed (see " + gp_path.string() + ".log)");
  }
}

}  // namespace

void require_gnuplot() {
  if (std::system("command -v gnuplot > /dev/null 2>&1") != 0) {
    throw std::runtime_error("gnuplot not found: install Debian's gnuplot-nox (scripts/setup.sh does)");
  }
}

void draw_lines(const std::string& png_path, const Chart& chart, const std::vector<Series>& series) {
  std::ostringstream gp;
  gp << preamble(png_path, chart);
  bool any_highlight = false;
  for (const Series& s : series) any_highlight |= s.highlight;
  bool any_data = false;
  for (size_t i = 0; i < series.size(); ++i) {
    gp << "$d" << i << " << EOD\n";
    for (const auto& [x, y] : series[i].points) {
      if (std::isfinite(x) && std::isfinite(y)) gp << x << " " << y << "\n", any_data = true;
    }
    gp << "EOD\n";
  }
  if (!any_data) gp << "set label 'no data yet' at graph 0.45, graph 0.5\nplot NaN notitle\n";
  else {
    gp << "plot ";
    bool first = true;
    for (size_t i = 0; i < series.size(); ++i) {
      if (series[i].points.empty()) continue;
      gp << (first ? "" : ", \\\n     ") << "$d" << i << " using 1:2 ";
      first = false;
      const std::string style = chart.points_only ? "points pt 7 ps 1.5" : "lines";
      if (any_highlight && !series[i].highlight) {
        gp << "with " << style << " lw 1 lc rgb '#b0b0b0' title " << quoted(series[i].title);
      } else {
        gp << "with " << style << " lw " << (any_highlight ? 3 : 1.5) << " title " << quoted(series[i].title);
      }
    }
    gp << "\n";
  }
  run_gnuplot(png_path, gp.str());
}

void draw_heatmap(const std::string& png_path, const Chart& chart, const std::vector<std::string>& row_labels,
                  const std::vector<double>& x, const std::vector<std::vector<double>>& values) {
  std::ostringstream gp;
  gp << preamble(png_path, chart) << "set autoscale xfix\nset palette defined (0 '#ffffff', 1 '#fdae61', 2 '#d7191c')\n";
  gp << "set ytics (";
  for (size_t r = 0; r < row_labels.size(); ++r) gp << (r ? ", " : "") << quoted(row_labels[r]) << " " << r;
  gp << ")\nset yrange [-0.5:" << row_labels.size() - 0.5 << "]\n$m << EOD\n";
  for (size_t r = 0; r < values.size(); ++r) {
    for (size_t c = 0; c < values[r].size() && c < x.size(); ++c) {
      if (std::isfinite(values[r][c])) gp << x[c] << " " << r << " " << values[r][c] << "\n";
    }
  }
  // Each (step, layer) cell a box as wide as the step spacing and one row high.
  const double width = x.size() > 1 ? (x.back() - x.front()) / static_cast<double>(x.size() - 1) : 1.0;
  gp << "EOD\nset style fill solid noborder\nplot $m using 1:2:(" << width / 2 << "):(0.5):3 with boxxyerror palette notitle\n";
  run_gnuplot(png_path, gp.str());
}

}  // namespace fmoe::launch
