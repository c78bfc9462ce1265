// Config <-> JSON, --set overrides, validation and the generated reference, all driven by the
// visit() schema in config.h. Each visitor below walks that schema once.
#include "difftrain/config.h"
#include "difftrain/device_spec.h"  // parse_device_spec: run.device's grammar

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <set>
#include <sstream>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

namespace difftrain {

using json = nlohmann::ordered_json;
using Errors = std::vector<std::string>;

std::vector<std::string> split_enum_list(std::string_view list) {
  std::vector<std::string> out;
  std::string cur;
  auto flush = [&] {
    while (!cur.empty() && cur.back() == '_') cur.pop_back();  // `default_` is spelled "default"
    if (!cur.empty()) out.push_back(cur);
    cur.clear();
  };
  for (char c : list) {
    if (c == ',') flush();
    else if (c != ' ') cur.push_back(c);
  }
  flush();
  return out;
}

ConfigError::ConfigError(std::vector<std::string> messages, std::string context)
    : UsageError([&] {
        std::string what = context.empty() ? "invalid configuration" : context;
        if (messages.size() == 1) return what + ": " + messages[0];
        what += fmt::format(" ({} problems):", messages.size());
        for (const auto& m : messages) what += "\n  - " + m;
        return what;
      }()),
      messages_(std::move(messages)) {}

size_t edit_distance(std::string_view a, std::string_view b) {
  // Damerau-Levenshtein (optimal string alignment): a transposition counts as one edit.
  std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (size_t i = 1; i <= a.size(); ++i)
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  return d[a.size()][b.size()];
}

namespace {

// ---------------------------------------------------------------------------------------------
// Field types: name, JSON read/write, value checks, allowed-values text.

template <class T> struct is_vector : std::false_type {};
template <class T> struct is_vector<std::vector<T>> : std::true_type {};
template <class T> struct is_optional : std::false_type {};
template <class T> struct is_optional<std::optional<T>> : std::true_type {};
template <class T> constexpr bool is_enum_v = std::is_enum_v<T>;
template <class T> struct strip_optional { using type = T; };
template <class T> struct strip_optional<std::optional<T>> { using type = T; };
template <class T> struct element { using type = typename strip_optional<T>::type; };  // of a list or optional
template <class T> struct element<std::vector<T>> { using type = T; };
template <class T> constexpr bool is_int_v = std::is_integral_v<T> && !std::is_same_v<T, bool>;

std::string describe(const json& j) {
  switch (j.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "boolean " + j.dump();
    case json::value_t::string: return "string " + j.dump();
    case json::value_t::array: return "a list";
    case json::value_t::object: return "an object";
    default: return "number " + j.dump();
  }
}

// Shortest text that reads back as x; whole numbers without ".0" (bounds read "[0, 1)").
// User text in messages: JSON-quoted, so control characters and NULs cannot garble the terminal.
std::string quoted(const std::string& s) { return json(s).dump(); }

std::string number_text(double x) {
  if (std::isfinite(x) && x == std::floor(x) && std::fabs(x) < 1e15) return std::to_string(static_cast<int64_t>(x));
  return json(x).dump();
}

template <class T> std::string type_name() {
  if constexpr (std::is_same_v<T, bool>) return "boolean";
  else if constexpr (is_int_v<T>) return "integer";
  else if constexpr (std::is_floating_point_v<T>) return "number";
  else if constexpr (std::is_same_v<T, std::string>) return "string";
  else if constexpr (is_enum_v<T>) return "enum";
  else if constexpr (is_vector<T>::value) return "list of " + type_name<typename T::value_type>() + "s";
  else if constexpr (is_optional<T>::value) return type_name<typename T::value_type>() + " or null";
}

template <class T> json to_json_value(const T& v) {
  if constexpr (is_enum_v<T>) return to_string(v);
  else if constexpr (is_vector<T>::value) {
    json a = json::array();
    for (const auto& e : v) a.push_back(to_json_value(e));
    return a;
  } else if constexpr (is_optional<T>::value) {
    return v ? to_json_value(*v) : json(nullptr);
  } else {
    return v;
  }
}

template <class T> void read_value(const json& j, T& out, const std::string& path, Errors& errs) {
  auto wrong = [&](const std::string& want) { errs.push_back(fmt::format("{}: expected {}, got {}", path, want, describe(j))); };
  if constexpr (std::is_same_v<T, bool>) {
    if (!j.is_boolean()) return wrong("a boolean (true or false)");
    out = j.get<bool>();
  } else if constexpr (is_int_v<T>) {
    if (j.is_number_float()) {
      double d = j.get<double>();
      if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) {  // 1e3, 64.0
        if (d < static_cast<double>(std::numeric_limits<T>::min()) || d > static_cast<double>(std::numeric_limits<T>::max()))
          return wrong(fmt::format("an integer in [{}, {}]", std::numeric_limits<T>::min(), std::numeric_limits<T>::max()));
        out = static_cast<T>(d);
        return;
      }
      return wrong("an integer");
    }
    if (!j.is_number_integer()) return wrong("an integer");
    if (j.is_number_unsigned() ? j.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<T>::max())
                               : (j.get<int64_t>() < std::numeric_limits<T>::min() || j.get<int64_t>() > std::numeric_limits<T>::max()))
      return wrong(fmt::format("an integer in [{}, {}]", std::numeric_limits<T>::min(), std::numeric_limits<T>::max()));
    out = static_cast<T>(j.get<int64_t>());
  } else if constexpr (std::is_floating_point_v<T>) {
    if (!j.is_number()) return wrong("a number");
    out = j.get<T>();
  } else if constexpr (std::is_same_v<T, std::string>) {
    if (!j.is_string()) return wrong("a string");
    out = j.get<std::string>();
  } else if constexpr (is_enum_v<T>) {
    const std::string allowed = fmt::format("{}", fmt::join(enum_names<T>(), " | "));
    if (!j.is_string()) return wrong("one of " + allowed);
    auto e = enum_from_string<T>(j.get<std::string>());
    if (!e) {
      std::string msg = fmt::format("{}: unknown value {}; allowed: {}", path, j.dump(), allowed);
      for (const auto& name : enum_names<T>())
        if (edit_distance(j.get<std::string>(), name) <= 2) { msg += fmt::format(" (did you mean \"{}\"?)", name); break; }
      errs.push_back(msg);
      return;
    }
    out = *e;
  } else if constexpr (is_vector<T>::value) {
    if (!j.is_array()) return wrong("a list");
    T result(j.size());
    size_t before = errs.size();
    for (size_t i = 0; i < j.size(); ++i) read_value(j[i], result[i], fmt::format("{}[{}]", path, i), errs);
    if (errs.size() == before) out = std::move(result);
  } else if constexpr (is_optional<T>::value) {
    if (j.is_null()) { out.reset(); return; }
    typename T::value_type inner{};
    size_t before = errs.size();
    read_value(j, inner, path, errs);
    if (errs.size() == before) out = inner;
  }
}

std::string range_text(const Allowed& a) {
  if (a.min && a.max)
    return fmt::format("{}{}, {}{}", a.min_open ? '(' : '[', number_text(*a.min), number_text(*a.max), a.max_open ? ')' : ']');
  if (a.min) return fmt::format("{} {}", a.min_open ? ">" : ">=", number_text(*a.min));
  if (a.max) return fmt::format("{} {}", a.max_open ? "<" : "<=", number_text(*a.max));
  return {};
}

template <class T> void check_value(const T& v, const Allowed& a, const std::string& path, Errors& errs) {
  if constexpr (std::is_arithmetic_v<T> && !std::is_same_v<T, bool>) {
    const double x = static_cast<double>(v);
    bool ok = std::isfinite(x);
    if (a.min) ok = ok && (a.min_open ? x > *a.min : x >= *a.min);
    if (a.max) ok = ok && (a.max_open ? x < *a.max : x <= *a.max);
    if (!ok) {
      std::string r = range_text(a);
      errs.push_back(fmt::format("{}: must be {}{}, got {}", path, a.min && a.max ? "in " : "", r.empty() ? "finite" : r,
                                 to_json_value(v).dump()));
    }
  } else if constexpr (std::is_same_v<T, std::string>) {
    if (a.non_empty && v.empty()) errs.push_back(path + ": must not be empty");
  } else if constexpr (is_vector<T>::value) {
    if (a.non_empty && v.empty()) errs.push_back(path + ": must not be an empty list");
    for (size_t i = 0; i < v.size(); ++i) check_value(v[i], a, fmt::format("{}[{}]", path, i), errs);
  } else if constexpr (is_optional<T>::value) {
    if (v) check_value(*v, a, path, errs);
  }
}

template <class T> std::string allowed_text(const Allowed& a) {
  std::vector<std::string> parts;
  using Base = typename element<T>::type;
  if constexpr (is_enum_v<Base>)
    if (a.note.empty()) parts.push_back(fmt::format("{}", fmt::join(enum_names<Base>(), " \\| ")));
  if (std::string r = range_text(a); !r.empty()) parts.push_back(r);
  if (a.non_empty) parts.push_back("non-empty");
  if (!a.note.empty()) {
    std::string note(a.note);
    size_t pos = 0;
    while ((pos = note.find('|', pos)) != std::string::npos) { note.replace(pos, 1, "\\|"); pos += 2; }
    parts.push_back(note);
  }
  return fmt::format("{}", fmt::join(parts, "; "));
}

// ---------------------------------------------------------------------------------------------
// Visitors.

// Collects every leaf path ("train.batch_size"), for "did you mean" across sections.
struct PathCollector {
  std::string prefix;
  std::vector<std::string>* paths;
  template <class T> void operator()(const char* key, T&, const char*, const Allowed& = {}) { paths->push_back(prefix + key); }
  template <class S> void section(const char* key, S& s, const char*) {
    paths->push_back(prefix + key);
    PathCollector sub{prefix + key + ".", paths};
    s.visit(sub);
  }
};

std::vector<std::string> all_paths() {
  static const std::vector<std::string> paths = [] {
    std::vector<std::string> p;
    Config cfg;
    PathCollector c{"", &p};
    cfg.visit(c);
    return p;
  }();
  return paths;
}

std::string suggestion(const std::string& key, const std::vector<std::string>& siblings) {
  const size_t limit = std::max<size_t>(2, key.size() / 3);
  std::string best;
  size_t best_d = limit + 1;
  for (const auto& s : siblings)
    if (size_t d = edit_distance(key, s); d < best_d) best_d = d, best = s;
  if (!best.empty()) return fmt::format("; did you mean \"{}\"?", best);
  // Not a near miss here: perhaps the key belongs to another section.
  std::vector<std::string> elsewhere;
  for (const auto& p : all_paths()) {
    const std::string leaf = p.substr(p.rfind('.') == std::string::npos ? 0 : p.rfind('.') + 1);
    if (edit_distance(key, leaf) <= (key.size() > 4 ? 1u : 0u)) elsewhere.push_back(p);
  }
  if (!elsewhere.empty()) return fmt::format("; did you mean {}?", fmt::join(elsewhere, " or "));
  return {};
}

struct JsonReader {
  const json& obj;
  std::string prefix;
  Errors& errs;
  std::vector<std::string> known{};

  template <class T> void operator()(const char* key, T& field, const char*, const Allowed& = {}) {
    known.emplace_back(key);
    if (auto it = obj.find(key); it != obj.end()) read_value(*it, field, prefix + key, errs);
  }
  template <class S> void section(const char* key, S& s, const char*) {
    known.emplace_back(key);
    auto it = obj.find(key);
    if (it == obj.end()) return;
    if (!it->is_object()) {
      errs.push_back(fmt::format("{}{}: expected an object (a section), got {}", prefix, key, describe(*it)));
      return;
    }
    JsonReader sub{*it, prefix + key + ".", errs};
    s.visit(sub);
    sub.finish();
  }
  void finish() {
    for (auto it = obj.begin(); it != obj.end(); ++it)
      if (std::find(known.begin(), known.end(), it.key()) == known.end())
        errs.push_back(fmt::format("{}{}: unknown key{}", prefix, it.key(), suggestion(it.key(), known)));
  }
};

struct JsonWriter {
  json& out;
  template <class T> void operator()(const char* key, T& field, const char*, const Allowed& = {}) { out[key] = to_json_value(field); }
  template <class S> void section(const char* key, S& s, const char*) {
    json sub = json::object();
    JsonWriter w{sub};
    s.visit(w);
    out[key] = std::move(sub);
  }
};

struct ValueChecker {
  std::string prefix;
  Errors& errs;
  template <class T> void operator()(const char* key, T& field, const char*, const Allowed& a = {}) {
    check_value(field, a, prefix + key, errs);
  }
  template <class S> void section(const char* key, S& s, const char*) {
    ValueChecker sub{prefix + key + ".", errs};
    s.visit(sub);
  }
};

// How a --set value is turned into JSON: by the type of the field it names.
enum class Shape { unknown, string, string_list, list, other };
struct ShapeFinder {
  std::string target;
  std::string prefix;
  Shape* shape;
  template <class T> void operator()(const char* key, T&, const char*, const Allowed& = {}) {
    if (prefix + key != target) return;
    using Base = typename strip_optional<T>::type;
    if constexpr (std::is_same_v<Base, std::string> || is_enum_v<Base>) *shape = Shape::string;
    else if constexpr (is_vector<Base>::value && is_enum_v<typename element<Base>::type>) *shape = Shape::string_list;
    else if constexpr (is_vector<Base>::value) *shape = Shape::list;
    else *shape = Shape::other;
  }
  template <class S> void section(const char* key, S& s, const char*) {
    ShapeFinder sub{target, prefix + key + ".", shape};
    s.visit(sub);
  }
};

struct DocWriter {
  std::string* out;
  const char* section_key = "";
  template <class T> void operator()(const char* key, T& field, const char* doc, const Allowed& a = {}) {
    *out += fmt::format("| `{}.{}` | {} | `{}` | {} | {} |\n", section_key, key, type_name<T>(), to_json_value(field).dump(),
                        allowed_text<T>(a), doc);
  }
  template <class S> void section(const char* key, S& s, const char* doc) {
    *out += fmt::format("\n## `{}`\n\n{}\n\n| key | type | default | allowed | meaning |\n|---|---|---|---|---|\n", key, doc);
    DocWriter sub{out, key};
    s.visit(sub);
  }
};

// ---------------------------------------------------------------------------------------------
// Cross-field rules: each carries the sentence the reference prints for it.

struct Rule {
  const char* doc;
  std::function<void(const Config&, Errors&)> check;
};

bool is_down_type(BlockType t) { return t == BlockType::DownBlock2D || t == BlockType::AttnDownBlock2D; }
bool is_attn_type(BlockType t) { return t == BlockType::AttnDownBlock2D || t == BlockType::AttnUpBlock2D; }

const std::vector<Rule>& rules() {
  static const std::vector<Rule> r = {
      {"`run.name` uses only letters, digits, '.', '_' and '-' (it names a directory), and is not '.' or '..'.",
       [](const Config& c, Errors& e) {
         bool ok = c.run.name != "." && c.run.name != "..";
         for (char ch : c.run.name)
           ok = ok && (std::isalnum(static_cast<unsigned char>(ch)) || ch == '.' || ch == '_' || ch == '-');
         if (!ok && !c.run.name.empty())
           e.push_back(fmt::format("run.name: {} may only use letters, digits, '.', '_' and '-'", quoted(c.run.name)));
       }},
      {"`run.device` is `auto`, `cpu`, `cuda` or `cuda:N`.",
       [](const Config& c, Errors& e) {
         if (!parse_device_spec(c.run.device))
           e.push_back(fmt::format("run.device: unknown device {}; allowed: {}", quoted(c.run.device), kDeviceGrammar));
       }},
      {"`model.down_block_types` and `model.up_block_types` have one entry per `model.block_out_channels` entry.",
       [](const Config& c, Errors& e) {
         const size_t n = c.model.block_out_channels.size();
         if (c.model.down_block_types.size() != n)
           e.push_back(fmt::format("model.down_block_types: has {} entries but model.block_out_channels has {}",
                                   c.model.down_block_types.size(), n));
         if (c.model.up_block_types.size() != n)
           e.push_back(fmt::format("model.up_block_types: has {} entries but model.block_out_channels has {}",
                                   c.model.up_block_types.size(), n));
       }},
      {"`model.down_block_types` holds only DownBlock2D / AttnDownBlock2D, `model.up_block_types` only UpBlock2D / "
       "AttnUpBlock2D.",
       [](const Config& c, Errors& e) {
         for (size_t i = 0; i < c.model.down_block_types.size(); ++i)
           if (!is_down_type(c.model.down_block_types[i]))
             e.push_back(fmt::format("model.down_block_types[{}]: \"{}\" is not a down block; allowed: DownBlock2D | AttnDownBlock2D",
                                     i, to_string(c.model.down_block_types[i])));
         for (size_t i = 0; i < c.model.up_block_types.size(); ++i)
           if (is_down_type(c.model.up_block_types[i]))
             e.push_back(fmt::format("model.up_block_types[{}]: \"{}\" is not an up block; allowed: UpBlock2D | AttnUpBlock2D", i,
                                     to_string(c.model.up_block_types[i])));
       }},
      {"Every `model.block_out_channels` entry is divisible by `model.norm_num_groups`.",
       [](const Config& c, Errors& e) {
         for (size_t i = 0; i < c.model.block_out_channels.size(); ++i)
           if (c.model.norm_num_groups > 0 && c.model.block_out_channels[i] % c.model.norm_num_groups != 0)
             e.push_back(fmt::format("model.block_out_channels[{}]: {} is not divisible by model.norm_num_groups = {}", i,
                                     c.model.block_out_channels[i], c.model.norm_num_groups));
       }},
      {"`model.attention_head_dim`, when set, divides the channels of every attention level (and of the mid block).",
       [](const Config& c, Errors& e) {
         if (!c.model.attention_head_dim || *c.model.attention_head_dim <= 0) return;
         const int hd = *c.model.attention_head_dim;
         const auto& ch = c.model.block_out_channels;
         for (size_t i = 0; i < ch.size() && i < c.model.down_block_types.size(); ++i)
           if (is_attn_type(c.model.down_block_types[i]) && ch[i] % hd != 0)
             e.push_back(fmt::format("model.attention_head_dim: {} does not divide model.block_out_channels[{}] = {} "
                                     "(an attention level)", hd, i, ch[i]));
         for (size_t i = 0; i < ch.size() && i < c.model.up_block_types.size(); ++i) {
           const size_t level = ch.size() - 1 - i;  // up blocks run from the lowest resolution
           if (is_attn_type(c.model.up_block_types[i]) && ch[level] % hd != 0)
             e.push_back(fmt::format("model.attention_head_dim: {} does not divide model.block_out_channels[{}] = {} "
                                     "(model.up_block_types[{}] is an attention block)", hd, level, ch[level], i));
         }
         if (c.model.add_attention && !ch.empty() && ch.back() % hd != 0)
           e.push_back(fmt::format("model.attention_head_dim: {} does not divide the mid block's {} channels", hd, ch.back()));
       }},
      {"`model.sample_size` is divisible by 2^(levels - 1), one halving per down block but the last.",
       [](const Config& c, Errors& e) {
         const size_t levels = c.model.block_out_channels.size();
         if (levels == 0) return;
         if (levels > 16) {
           e.push_back(fmt::format("model.block_out_channels: {} levels; at most 16 are supported", levels));
           return;
         }
         const int factor = 1 << (levels - 1);
         if (c.model.sample_size % factor != 0)
           e.push_back(fmt::format("model.sample_size: {} is not divisible by {} (2^{} for {} levels)", c.model.sample_size,
                                   factor, levels - 1, levels));
       }},
      {"`model.in_channels` and `model.out_channels` equal `data.channels`; `model.sample_size` equals `data.resolution`.",
       [](const Config& c, Errors& e) {
         if (c.model.in_channels != c.data.channels)
           e.push_back(fmt::format("model.in_channels: {} differs from data.channels = {}", c.model.in_channels, c.data.channels));
         if (c.model.out_channels != c.data.channels)
           e.push_back(fmt::format("model.out_channels: {} differs from data.channels = {} (the model predicts an image-shaped "
                                   "target)", c.model.out_channels, c.data.channels));
         if (c.model.sample_size != c.data.resolution)
           e.push_back(fmt::format("model.sample_size: {} differs from data.resolution = {}", c.model.sample_size,
                                   c.data.resolution));
       }},
      {"`data.channels` is 1 or 3.",
       [](const Config& c, Errors& e) {
         if (c.data.channels != 1 && c.data.channels != 3)
           e.push_back(fmt::format("data.channels: must be 1 or 3, got {}", c.data.channels));
       }},
      {"`diffusion.beta_start` < `diffusion.beta_end` (except for squaredcos_cap_v2, which ignores both).",
       [](const Config& c, Errors& e) {
         if (c.diffusion.beta_schedule != BetaSchedule::squaredcos_cap_v2 && !(c.diffusion.beta_start < c.diffusion.beta_end))
           e.push_back(fmt::format("diffusion.beta_start: {} must be below diffusion.beta_end = {}",
                                   number_text(c.diffusion.beta_start), number_text(c.diffusion.beta_end)));
       }},
      {"`diffusion.rescale_betas_zero_snr` needs `diffusion.prediction_type` = v_prediction (ε is undefined at zero SNR, "
       "Lin et al. 2023 §3.2).",
       [](const Config& c, Errors& e) {
         if (c.diffusion.rescale_betas_zero_snr && c.diffusion.prediction_type != PredictionType::v_prediction)
           e.push_back(fmt::format("diffusion.rescale_betas_zero_snr: needs diffusion.prediction_type = v_prediction, got {}",
                                   to_string(c.diffusion.prediction_type)));
       }},
      {"`diffusion.formulation` = edm samples with `sampling.sampler` = heun or euler, and ddpm with the others; edm "
       "needs `diffusion.sigma_min` < `diffusion.sigma_max`, and takes no `diffusion.snr_gamma` and only "
       "`diffusion.prediction_type` = epsilon (its preconditioned output is neither ε, v nor x₀).",
       [](const Config& c, Errors& e) {
         const auto& d = c.diffusion;
         const bool edm = d.formulation == Formulation::edm;
         if (edm != is_edm_sampler(c.sampling.sampler))
           e.push_back(
               fmt::format("sampling.sampler: {} is {}; with diffusion.formulation = {} use {}", to_string(c.sampling.sampler),
                           edm ? "a DDPM sampler" : "an EDM sampler", to_string(d.formulation),
                           edm ? "heun or euler" : "ddpm, ddim, dpm_solver_multistep, unipc_multistep or euler_ancestral"));
         if (!edm) return;
         if (!(d.sigma_min < d.sigma_max))
           e.push_back(fmt::format("diffusion.sigma_min: {} must be below diffusion.sigma_max = {}", number_text(d.sigma_min),
                                   number_text(d.sigma_max)));
         if (d.snr_gamma)
           e.push_back(
               fmt::format("diffusion.snr_gamma: {} is a DDPM loss weighting; with diffusion.formulation = edm the loss "
                           "weight is λ(σ) of Karras et al. (set snr_gamma to null)",
                           number_text(*d.snr_gamma)));
         if (d.prediction_type != PredictionType::epsilon)
           e.push_back(
               fmt::format("diffusion.prediction_type: {} is not defined for diffusion.formulation = edm (the network "
                           "output is preconditioned by c_skip and c_out); keep epsilon",
                           to_string(d.prediction_type)));
       }},
      {"`sampling.num_inference_steps` <= `diffusion.num_train_timesteps` (ddpm).",
       [](const Config& c, Errors& e) {
         if (c.diffusion.formulation == Formulation::ddpm && c.sampling.num_inference_steps > c.diffusion.num_train_timesteps)
           e.push_back(fmt::format("sampling.num_inference_steps: {} exceeds diffusion.num_train_timesteps = {}",
                                   c.sampling.num_inference_steps, c.diffusion.num_train_timesteps));
       }},
      {"`sampling.use_karras_sigmas` needs `sampling.sampler` = dpm_solver_multistep or unipc_multistep.",
       [](const Config& c, Errors& e) {
         if (c.sampling.use_karras_sigmas && c.sampling.sampler != Sampler::dpm_solver_multistep &&
             c.sampling.sampler != Sampler::unipc_multistep)
           e.push_back(
               fmt::format("sampling.use_karras_sigmas: true needs sampling.sampler = dpm_solver_multistep or "
                           "unipc_multistep, got {}",
                           to_string(c.sampling.sampler)));
       }},
      {"`sampling.guidance_scale` other than 1 needs a class-conditional model (`model.num_class_embeds`); with one, "
       "every `data.class_filter` label is below `model.num_class_embeds`.",
       [](const Config& c, Errors& e) {
         if (!c.model.num_class_embeds && c.sampling.guidance_scale != 1.0)
           e.push_back(fmt::format("sampling.guidance_scale: {} needs a class-conditional model (set model.num_class_embeds) "
                                   "or 1.0", number_text(c.sampling.guidance_scale)));
         if (c.model.num_class_embeds)
           for (size_t i = 0; i < c.data.class_filter.size(); ++i)
             if (c.data.class_filter[i] >= *c.model.num_class_embeds)
               e.push_back(fmt::format("data.class_filter[{}]: label {} is not below model.num_class_embeds = {}", i,
                                       c.data.class_filter[i], *c.model.num_class_embeds));
       }},
      {"`data.subset`, when set, holds at least one batch (`train.batch_size`), since the last partial batch is dropped.",
       [](const Config& c, Errors& e) {
         if (c.data.subset > 0 && c.data.subset < c.train.batch_size)
           e.push_back(fmt::format("data.subset: {} items is less than one batch (train.batch_size = {})", c.data.subset,
                                   c.train.batch_size));
       }},
      {"`train.mixed_precision` = fp16 and `distributed.backend` = nccl need a CUDA device (not `run.device` = cpu).",
       [](const Config& c, Errors& e) {
         if (c.run.device != "cpu") return;
         if (c.train.mixed_precision == MixedPrecision::fp16)
           e.push_back("train.mixed_precision: fp16 needs CUDA but run.device is \"cpu\"; use \"no\" or \"bf16\"");
         if (c.distributed.backend == DistBackend::nccl)
           e.push_back("distributed.backend: nccl needs CUDA but run.device is \"cpu\"; use \"gloo\" or \"auto\"");
       }},
      {"`data.preload` keeps center-cropped images: it needs `data.crop` = center.",
       [](const Config& c, Errors& e) {
         if (c.data.preload && c.data.crop != CropMode::center)
           e.push_back("data.crop: random crops are not available with data.preload = true (preloaded images are cropped once); "
                       "use center, or preload = false");
       }},
      {"`ema.min_decay` <= `ema.decay`.",
       [](const Config& c, Errors& e) {
         if (c.ema.min_decay > c.ema.decay)
           e.push_back(fmt::format("ema.min_decay: {} exceeds ema.decay = {}", number_text(c.ema.min_decay),
                                   number_text(c.ema.decay)));
       }},
      {"`checkpoint.keep_every` is a multiple of `checkpoint.every` (a kept step must be a checkpoint step).",
       [](const Config& c, Errors& e) {
         if (c.checkpoint.keep_every > 0 && c.checkpoint.every > 0 && c.checkpoint.keep_every % c.checkpoint.every != 0)
           e.push_back(fmt::format("checkpoint.keep_every: {} is not a multiple of checkpoint.every = {}",
                                   c.checkpoint.keep_every, c.checkpoint.every));
       }},
  };
  return r;
}

// ---------------------------------------------------------------------------------------------
// Reading files: strict JSON with line and column on errors, duplicate keys rejected.

std::string line_col(const std::string& text, size_t byte) {
  size_t line = 1, col = 1;
  for (size_t i = 0; i + 1 < byte && i < text.size(); ++i) {
    if (text[i] == '\n') ++line, col = 1;
    else ++col;
  }
  return fmt::format("{}:{}", line, col);
}

json parse_file(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::exists(path, ec)) throw ConfigError({path + ": no such file"}, "cannot read configuration");
  if (!fs::is_regular_file(path, ec)) throw ConfigError({path + ": not a regular file"}, "cannot read configuration");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError({fmt::format("{}: {}", path, std::strerror(errno))}, "cannot read configuration");
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();

  // A config is two levels deep; anything past kMaxDepth is rejected rather than parsed.
  constexpr int kMaxDepth = 32;
  struct TooDeep {};
  Errors dups;
  std::vector<std::pair<std::set<std::string>, std::string>> frames;  // (keys seen, current key) per open object
  auto callback = [&](int depth, json::parse_event_t ev, json& parsed) {
    if (depth > kMaxDepth) throw TooDeep{};
    if (ev == json::parse_event_t::object_start) frames.emplace_back();
    else if (ev == json::parse_event_t::object_end && !frames.empty()) frames.pop_back();
    else if (ev == json::parse_event_t::key && !frames.empty()) {
      const std::string key = parsed.get<std::string>();
      if (!frames.back().first.insert(key).second) {
        std::string where;
        for (size_t i = 0; i + 1 < frames.size(); ++i) where += frames[i].second + ".";
        dups.push_back(fmt::format("{}{}: duplicate key", where, key));
      }
      frames.back().second = key;
    }
    return true;
  };
  json j;
  try {
    j = json::parse(text, callback, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const TooDeep&) {
    throw ConfigError({fmt::format("{}: nested deeper than {} levels; a config has sections of keys", path, kMaxDepth)},
                      "cannot read configuration");
  } catch (const json::parse_error& e) {
    std::string reason = e.what();
    if (auto p = reason.find(": "); p != std::string::npos && reason.find("parse error") != std::string::npos)
      reason = reason.substr(p + 2);  // drop nlohmann's "[json.exception...] parse error at ..." prefix
    throw ConfigError({fmt::format("{}:{}: invalid JSON: {}", path, line_col(text, e.byte), reason)}, "cannot read configuration");
  } catch (const json::exception& e) {  // out_of_range 406: a number beyond a double (1e400), found by fuzzing
    std::string reason = e.what();
    if (auto p = reason.find("] "); p != std::string::npos) reason = reason.substr(p + 2);
    throw ConfigError({fmt::format("{}: invalid JSON: {} (beyond the range of a double)", path, reason)},
                      "cannot read configuration");
  }
  if (!dups.empty()) throw ConfigError(dups, path);
  if (!j.is_object()) throw ConfigError({fmt::format("{}: the top level must be a JSON object, got {}", path, describe(j))}, path);
  return j;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

namespace {
// Range, enum-subset and non-empty checks of every field (a field that failed to read kept its
// default, which passes).
void check_values(const Config& cfg, Errors& errs) {
  Config copy = cfg;  // visit() takes non-const refs; the checker only reads
  ValueChecker checker{"", errs};
  copy.visit(checker);
}

// Defaults that follow the run, and valid values worth a warning. A warmup longer than the run is
// what diffusers' get_scheduler accepts (the LR ends below its peak), so it is not an error; the
// default (100) is capped so that a short run (smoke test, max_steps = 20) trains as asked.
void adjust_defaults(const nlohmann::ordered_json& j, Config& cfg, std::vector<std::string>* notes) {
  // The default sampler is a DDPM one; an EDM run without a sampler takes Algorithm 1 (heun).
  const bool sampler_given = j.contains("sampling") && j["sampling"].is_object() && j["sampling"].contains("sampler");
  if (cfg.diffusion.formulation == Formulation::edm && !sampler_given && !is_edm_sampler(cfg.sampling.sampler))
    cfg.sampling.sampler = Sampler::heun;
  auto& t = cfg.train;
  if (t.lr_warmup_steps <= t.max_steps) return;
  const bool warmup_given = j.contains("train") && j["train"].is_object() && j["train"].contains("lr_warmup_steps");
  std::string note;
  if (warmup_given) {
    note = fmt::format(
        "train.lr_warmup_steps: {} exceeds train.max_steps = {}; the learning rate ends at {:.3g} of "
        "train.learning_rate",
        t.lr_warmup_steps, t.max_steps, static_cast<double>(t.max_steps - 1) / static_cast<double>(t.lr_warmup_steps));
  } else {
    note = fmt::format(
        "train.lr_warmup_steps: the default {} exceeds train.max_steps = {}; using {} (set it to keep "
        "another value)",
        t.lr_warmup_steps, t.max_steps, t.max_steps);
    t.lr_warmup_steps = t.max_steps;
  }
  if (notes) notes->push_back(std::move(note));
}
}  // namespace

std::vector<std::string> validate(const Config& cfg) {
  Errors errs;
  check_values(cfg, errs);
  for (const auto& rule : rules()) rule.check(cfg, errs);
  return errs;
}

Config config_from_json(const nlohmann::ordered_json& j, const std::string& origin, std::vector<std::string>* notes) {
  Config cfg;
  Errors errs;
  if (!j.is_object()) throw ConfigError({"the top level must be a JSON object, got " + describe(j)}, origin);
  JsonReader reader{j, "", errs};
  cfg.visit(reader);
  reader.finish();
  if (errs.empty()) adjust_defaults(j, cfg, notes);
  if (errs.empty()) errs = validate(cfg);
  else check_values(cfg, errs);  // cross-field checks on a half-read config would mislead
  if (!errs.empty()) throw ConfigError(errs, origin);
  return cfg;
}

nlohmann::ordered_json config_to_json(const Config& cfg) {
  json out = json::object();
  Config copy = cfg;
  JsonWriter w{out};
  copy.visit(w);
  return out;
}

std::string config_to_string(const Config& cfg) { return config_to_json(cfg).dump(2) + "\n"; }

void apply_override(nlohmann::ordered_json& doc, const std::string& assignment) {
  const auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    throw ConfigError({fmt::format("--set \"{}\": expected key.path=value, e.g. train.batch_size=32", assignment)});
  const std::string key = assignment.substr(0, eq);
  const std::string value = assignment.substr(eq + 1);

  Shape shape = Shape::unknown;
  Config probe;
  ShapeFinder finder{key, "", &shape};
  probe.visit(finder);

  json v;
  auto parse_or_string = [&](const std::string& text) {
    json parsed = json::parse(text, nullptr, /*allow_exceptions=*/false);
    return parsed.is_discarded() ? json(text) : parsed;
  };
  if (shape == Shape::string) {
    v = (!value.empty() && value.front() == '"') ? parse_or_string(value) : json(value);
  } else if (shape == Shape::string_list) {
    if (!value.empty() && value.front() == '[') v = parse_or_string(value);
    else {  // A,B,C: items split on commas, surrounding blanks trimmed, empty items kept (and rejected)
      v = json::array();
      size_t start = 0;
      while (true) {
        const size_t comma = value.find(',', start);
        std::string item = value.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        const size_t b = item.find_first_not_of(" \t"), e = item.find_last_not_of(" \t");
        v.push_back(b == std::string::npos ? std::string() : item.substr(b, e - b + 1));
        if (comma == std::string::npos) break;
        start = comma + 1;
      }
    }
  } else {
    v = parse_or_string(value);
    if (shape == Shape::list && !v.is_array()) {  // 1,2,3 or a single 64
      json wrapped = parse_or_string("[" + value + "]");
      if (wrapped.is_array()) v = wrapped;
    }
  }

  json* node = &doc;
  std::string walked;
  size_t start = 0;
  while (true) {
    const size_t dot = key.find('.', start);
    const std::string part = key.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if (part.empty()) throw ConfigError({fmt::format("--set \"{}\": empty key segment", assignment)});
    if (!node->is_object())
      throw ConfigError({fmt::format("--set \"{}\": {} is not a section", assignment, walked)});
    walked += (walked.empty() ? "" : ".") + part;
    if (dot != std::string::npos) {  // an intermediate segment must not name a field
      Shape leaf = Shape::unknown;
      ShapeFinder at{walked, "", &leaf};
      probe.visit(at);
      if (leaf != Shape::unknown)
        throw ConfigError({fmt::format("--set \"{}\": {} is not a section", assignment, walked)});
    }
    if (dot == std::string::npos) {
      (*node)[part] = v;
      return;
    }
    if (!node->contains(part)) (*node)[part] = json::object();
    node = &(*node)[part];
    start = dot + 1;
  }
}

Config load_config(const std::string& json_path, const std::vector<std::string>& overrides, std::vector<std::string>* notes) {
  json doc = json_path.empty() ? json::object() : parse_file(json_path);
  for (const auto& o : overrides) apply_override(doc, o);
  std::string origin = json_path.empty() ? "defaults" : json_path;
  if (!overrides.empty()) origin += fmt::format(" with {} --set override{}", overrides.size(), overrides.size() == 1 ? "" : "s");
  return config_from_json(doc, "invalid configuration (" + origin + ")", notes);
}

std::string config_reference_markdown() {
  std::string out =
      "<!-- @generated by `difftrain config docs` from include/difftrain/config.h; edit that file, then run `make docs`. "
      "test_config checks that this file is current. -->\n"
      "# Configuration reference\n\n"
      "A run is configured by one JSON file (`difftrain train --config FILE`). Every key is optional; a missing key keeps "
      "its default, so `{}` is the built-in quickstart job (Fashion-MNIST, a small UNet, CPU-friendly).\n\n"
      "Precedence: defaults < the JSON file < `--set key.path=value` (repeatable). A `--set` value is typed by the field it "
      "sets: `--set train.batch_size=32`, `--set run.name=exp1`, `--set model.block_out_channels=64,128,256` (or `[64,128,256]`), "
      "`--set model.down_block_types=DownBlock2D,AttnDownBlock2D`, `--set model.num_class_embeds=null`.\n\n"
      "Validation is strict and happens before anything runs: unknown keys (with a \"did you mean\"), wrong types, values "
      "out of range, unknown enum values and the cross-field rules below are errors that name the JSON path "
      "(`model.block_out_channels[2]`), and `difftrain` exits with code 1. The resolved configuration (every key) is "
      "written to `runs/<name>/config.json`; `difftrain config print` shows it without running anything.\n";
  Config cfg;
  DocWriter w{&out};
  cfg.visit(w);
  out += "\n## Cross-field rules\n\n";
  for (const auto& r : rules()) out += fmt::format("- {}\n", r.doc);
  return out;
}

}  // namespace difftrain
