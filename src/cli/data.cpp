// `difftrain data pack`: WebDataset shards from one of the dataset readers (shards.h).
#include <iostream>
#include <memory>

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "difftrain/config.h"
#include "difftrain/data.h"
#include "difftrain/log.h"
#include "difftrain/shards.h"

namespace difftrain::cli {

namespace {

struct PackCommand {
  DataConfig data;  // dataset, path, split, on_bad_image: what open_dataset reads
  PackOptions pack;
};

int run_pack(PackCommand cmd) {
  cmd.data.jpeg_dct_scaling = false;  // shards keep every image at its full size
  const auto dataset = open_dataset(cmd.data);
  log_info("data pack: {}", dataset->describe());
  const PackReport r = pack_shards(*dataset, cmd.pack);
  log_info("data pack: {} samples in {} shard(s) of up to {} in {} ({:.1f} MB): {} .. {}; index {}", r.samples, r.shards.size(),
           cmd.pack.shard_size, cmd.pack.out_dir, static_cast<double>(r.bytes) / 1e6, r.shards.front(), r.shards.back(), r.index);
  return 0;
}

}  // namespace

void set_data_command(CLI::App* app, int& exit_code) {
  auto* cmd = app->add_subcommand("data", "Dataset tools: `data pack` writes WebDataset shards from a dataset");
  cmd->require_subcommand(1);
  auto opts = std::make_shared<PackCommand>();  // owned by the callback, so by the App
  auto* pack =
      cmd->add_subcommand("pack",
                          "Write a dataset as WebDataset tar shards: KEY.png and KEY.cls per sample, in the dataset's order, and "
                          "PREFIX-index.json (each shard's sample count, webdataset's wids format; data.path may name it)");
  add_enum_option(pack, "--from", opts->data.dataset, "The reader, as data.dataset (webdataset repacks shards)")->required();
  pack->add_option("--path", opts->data.path, "The dataset, as data.path")->required();
  add_enum_option(pack, "--split", opts->data.split, "The split of an IDX or CIFAR-10 dataset")->default_str("train");
  add_enum_option(pack, "--on-bad-image", opts->data.on_bad_image, "Bad files in an image folder, as data.on_bad_image")
      ->default_str(to_string(opts->data.on_bad_image));
  pack->add_option("--out", opts->pack.out_dir, "Directory for the shards (created)")->required();
  pack->add_option("--shard-size", opts->pack.shard_size, "Samples per shard")->default_val(1000);
  pack->add_option("--prefix", opts->pack.prefix, "Shard file names: PREFIX-000000.tar, ...")->default_val("shard");
  pack->add_option("--limit", opts->pack.limit, "Only the first N items (0 = all)")->default_val(0);
  pack->callback([opts, &exit_code] { exit_code = run_pack(*opts); });
}

}  // namespace difftrain::cli
