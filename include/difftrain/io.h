// Whole-file I/O without LibTorch: reading a file, and replacing one atomically so that a crash
// or a full disk leaves either the old file or the new one, never a torn one.
#pragma once

#include <filesystem>
#include <string>
#include <string_view>

namespace difftrain {

// The bytes of a file; RuntimeError naming the path and errno's text when it cannot be read.
std::string read_text(const std::filesystem::path& path);

// Writes `content` to `path` atomically: a hidden temporary beside it (".<name>.<pid>.tmp", which
// Prometheus' textfile collector skips), fsync, rename, fsync of the directory.
void write_file_atomic(const std::filesystem::path& path, const std::string& content);

// Writes all of `data` to the file descriptor (retrying short writes and EINTR); errors name `path`.
void write_all(int fd, std::string_view data, const std::filesystem::path& path);

// fsync(2) of a file or a directory (a rename is durable once its directory is synced).
void fsync_path(const std::filesystem::path& path, bool directory);

}  // namespace difftrain
