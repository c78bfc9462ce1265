#include "difftrain/tar.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>

namespace difftrain::formats {

namespace {

constexpr uint64_t kBlock = 512;
constexpr uint64_t kMaxRecord = 1 << 20;  // a pax or GNU long-name record

uint64_t padding_of(uint64_t size) { return (kBlock - size % kBlock) % kBlock; }

// A NUL- or space-terminated octal field, or base-256 (first byte's high bit set, GNU and star).
bool parse_number(const uint8_t* field, size_t width, uint64_t& out) {
  out = 0;
  if (field[0] & 0x80) {
    if (field[0] != 0x80) return false;  // a negative number, or more than 64 bits
    for (size_t i = 1; i < width; ++i) {
      if (out >> 56) return false;
      out = (out << 8) | field[i];
    }
    return true;
  }
  size_t i = 0;
  while (i < width && field[i] == ' ') ++i;
  bool any = false;
  for (; i < width && field[i] >= '0' && field[i] <= '7'; ++i) {
    if (out >> 61) return false;
    out = out * 8 + static_cast<uint64_t>(field[i] - '0');
    any = true;
  }
  for (; i < width; ++i)
    if (field[i] != ' ' && field[i] != 0) return false;
  return any;
}

std::string field_text(const uint8_t* field, size_t width) {
  const auto* end = std::find(field, field + width, uint8_t{0});
  return std::string(reinterpret_cast<const char*>(field), static_cast<size_t>(end - field));
}

// POSIX: the sum of the header's bytes with the checksum field read as spaces. Some old writers
// summed signed chars; both are accepted.
bool checksum_ok(const std::array<uint8_t, kBlock>& h) {
  uint64_t stored = 0;
  if (!parse_number(h.data() + 148, 8, stored)) return false;
  int64_t unsigned_sum = 0, signed_sum = 0;
  for (size_t i = 0; i < kBlock; ++i) {
    const bool in_field = i >= 148 && i < 156;
    unsigned_sum += in_field ? ' ' : h[i];
    signed_sum += in_field ? ' ' : static_cast<int8_t>(h[i]);
  }
  return static_cast<int64_t>(stored) == unsigned_sum || static_cast<int64_t>(stored) == signed_sum;
}

void put_octal(uint8_t* field, size_t width, uint64_t value) {  // width - 1 digits and a NUL
  for (size_t i = width - 1; i-- > 0; value >>= 3) field[i] = static_cast<uint8_t>('0' + (value & 7));
  field[width - 1] = 0;
}

}  // namespace

// ---- reading ----------------------------------------------------------------------------------

TarReader::TarReader(std::istream& in, std::string name, uint64_t max_member)
    : in_(in), name_(std::move(name)), max_member_(max_member) {}

void TarReader::fail(const std::string& what, uint64_t at) const {
  throw FormatError(name_ + ": " + what + " (offset " + std::to_string(at) + "; not a tar archive, or a damaged one)");
}

void TarReader::read_exact(uint8_t* out, uint64_t n, const char* what) {
  in_.read(reinterpret_cast<char*>(out), static_cast<std::streamsize>(n));
  const auto got = static_cast<uint64_t>(in_.gcount());
  if (got != n)
    fail(std::string("truncated ") + what + ": " + std::to_string(got) + " of " + std::to_string(n) + " bytes", pos_ + got);
  pos_ += n;
}

void TarReader::skip(uint64_t n) {
  if (n == 0) return;
  in_.clear();
  const auto here = in_.tellg();
  if (here != std::istream::pos_type(-1)) {  // seekable: check the size instead of reading
    in_.seekg(0, std::ios::end);
    const auto end = in_.tellg();
    if (end != std::istream::pos_type(-1) && static_cast<uint64_t>(end - here) >= n) {
      in_.seekg(here + static_cast<std::streamoff>(n));
      pos_ += n;
      return;
    }
    in_.clear();
    in_.seekg(here);
  }
  std::vector<uint8_t> sink(static_cast<size_t>(std::min<uint64_t>(n, 1 << 16)));
  for (uint64_t left = n; left > 0;) {
    const uint64_t chunk = std::min<uint64_t>(left, sink.size());
    read_exact(sink.data(), chunk, "member data");
    left -= chunk;
  }
}

std::vector<uint8_t> TarReader::read_payload(uint64_t size, const char* what) {
  if (size > kMaxRecord) fail(std::string(what) + " of " + std::to_string(size) + " bytes", pos_);
  std::vector<uint8_t> data(static_cast<size_t>(size));
  read_exact(data.data(), size, what);
  skip(padding_of(size));
  return data;
}

bool TarReader::next(TarMember& member) {
  if (!data_read_ || data_left_ > 0) skip(data_left_);
  skip(padding_);
  data_left_ = padding_ = 0;
  data_read_ = true;
  std::string long_name;
  bool have_pax_size = false;
  uint64_t pax_size = 0;
  std::array<uint8_t, kBlock> h{};
  while (true) {
    const uint64_t at = pos_;
    in_.read(reinterpret_cast<char*>(h.data()), kBlock);
    const auto got = static_cast<uint64_t>(in_.gcount());
    if (got == 0 && long_name.empty() && !have_pax_size) return false;  // the end, without end blocks
    if (got != kBlock) fail("truncated header: " + std::to_string(got) + " of 512 bytes", at + got);
    pos_ += kBlock;
    if (std::all_of(h.begin(), h.end(), [](uint8_t b) { return b == 0; })) return false;  // end of archive
    if (!checksum_ok(h)) fail("header checksum mismatch", at);
    uint64_t size = 0;
    if (!parse_number(h.data() + 124, 12, size)) fail("bad size field in the header", at + 124);
    const char type = static_cast<char>(h[156]);
    if (type == 'x' || type == 'g') {  // pax: "<length> <key>=<value>\n" records
      const auto payload = read_payload(size, "pax header");
      if (type == 'g') continue;
      size_t i = 0;
      while (i < payload.size()) {
        size_t sp = i;
        uint64_t length = 0;
        while (sp < payload.size() && payload[sp] >= '0' && payload[sp] <= '9' && length < kMaxRecord)
          length = length * 10 + static_cast<uint64_t>(payload[sp++] - '0');
        if (sp >= payload.size() || payload[sp] != ' ' || length <= sp - i + 1 || i + length > payload.size() ||
            payload[i + length - 1] != '\n')
          fail("malformed pax record", at + kBlock + i);
        const std::string record(payload.begin() + static_cast<std::ptrdiff_t>(sp + 1),
                                 payload.begin() + static_cast<std::ptrdiff_t>(i + length - 1));
        const auto eq = record.find('=');
        if (eq == std::string::npos) fail("pax record without '='", at + kBlock + i);
        const std::string key = record.substr(0, eq), value = record.substr(eq + 1);
        if (key == "path") long_name = value;
        if (key == "size") {
          pax_size = 0;
          if (value.empty() || value.size() > 19 ||
              !std::all_of(value.begin(), value.end(), [](char c) { return c >= '0' && c <= '9'; }))
            fail("bad pax size '" + value + "'", at + kBlock + i);
          pax_size = std::stoull(value);
          have_pax_size = true;
        }
        i += length;
      }
      continue;
    }
    if (type == 'L') {  // GNU: the next header's name
      const auto payload = read_payload(size, "GNU long name");
      long_name = field_text(payload.data(), payload.size());
      continue;
    }
    if (type == 'K') {  // GNU: a long link name
      read_payload(size, "GNU long link name");
      continue;
    }
    if (have_pax_size) size = pax_size;
    const bool regular = type == '0' || type == 0 || type == '7';
    if (!regular) {  // a directory, link, device: no data to read (their size is 0, or skipped)
      if (type == '1' || type == '2' || type == '3' || type == '4' || type == '5' || type == '6') size = 0;
      skip(size);
      skip(padding_of(size));
      long_name.clear();
      have_pax_size = false;
      continue;
    }
    if (size > max_member_)
      fail("member of " + std::to_string(size) + " bytes, more than the " + std::to_string(max_member_) + " allowed", at + 124);
    std::string name = long_name;
    if (name.empty()) {
      name = field_text(h.data(), 100);
      const bool ustar = std::memcmp(h.data() + 257, "ustar", 5) == 0;
      const std::string prefix = ustar && h[262] == 0 ? field_text(h.data() + 345, 155) : "";  // POSIX, not GNU
      if (!prefix.empty()) name = prefix + "/" + name;
    }
    if (name.empty()) fail("member without a name", at);
    member = {name, size, pos_};
    data_left_ = size;
    padding_ = padding_of(size);
    data_read_ = false;
    return true;
  }
}

std::vector<uint8_t> TarReader::read_data() {
  if (data_read_) throw FormatError(name_ + ": member data read twice");
  std::vector<uint8_t> data(static_cast<size_t>(data_left_));
  read_exact(data.data(), data_left_, "member data");
  data_left_ = 0;
  data_read_ = true;
  return data;
}

std::vector<std::pair<TarMember, std::vector<uint8_t>>> read_tar_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FormatError(path + ": cannot open (" + std::strerror(errno) + ")");
  TarReader reader(in, path);
  std::vector<std::pair<TarMember, std::vector<uint8_t>>> out;
  TarMember m;
  while (reader.next(m)) out.emplace_back(m, reader.read_data());
  return out;
}

// ---- writing ----------------------------------------------------------------------------------

TarWriter::TarWriter(std::ostream& out, std::string name) : out_(out), name_(std::move(name)) {}

void TarWriter::write_header(const std::string& name, uint64_t size, char type) {
  std::array<uint8_t, kBlock> h{};
  std::memcpy(h.data(), name.data(), std::min<size_t>(name.size(), 100));
  put_octal(h.data() + 100, 8, 0644);
  put_octal(h.data() + 108, 8, 0);
  put_octal(h.data() + 116, 8, 0);
  put_octal(h.data() + 124, 12, size);
  put_octal(h.data() + 136, 12, 0);  // mtime 0: the same input writes the same bytes
  h[156] = static_cast<uint8_t>(type);
  std::memcpy(h.data() + 257, "ustar", 6);  // magic "ustar\0", version "00"
  std::memcpy(h.data() + 263, "00", 2);
  std::memset(h.data() + 148, ' ', 8);
  uint64_t sum = 0;
  for (uint8_t b : h) sum += b;
  put_octal(h.data() + 148, 7, sum);  // six digits, NUL, then the space left there
  out_.write(reinterpret_cast<const char*>(h.data()), kBlock);
}

void TarWriter::write_padded(const uint8_t* data, size_t size) {
  out_.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  static const std::array<char, kBlock> zeros{};
  out_.write(zeros.data(), static_cast<std::streamsize>(padding_of(size)));
}

void TarWriter::add(const std::string& member_name, const uint8_t* data, size_t size) {
  if (size >= (uint64_t{1} << 33)) throw FormatError(name_ + ": member " + member_name + " of 8 GiB or more");
  if (member_name.empty() || member_name.find('\0') != std::string::npos)
    throw FormatError(name_ + ": bad member name '" + member_name + "'");
  if (member_name.size() > 100) {  // a pax record carries the whole name
    std::string record = " path=" + member_name + "\n";
    size_t length = record.size() + 1;
    while (std::to_string(length).size() + record.size() != length) ++length;  // the length counts its own digits
    record = std::to_string(length) + record;
    write_header("././@PaxHeader", record.size(), 'x');
    write_padded(reinterpret_cast<const uint8_t*>(record.data()), record.size());
  }
  write_header(member_name, size, '0');
  write_padded(data, size);
  if (!out_) throw FormatError(name_ + ": write error");
}

void TarWriter::finish() {
  static const std::array<char, 2 * kBlock> zeros{};
  out_.write(zeros.data(), zeros.size());
  out_.flush();
  if (!out_) throw FormatError(name_ + ": write error");
}

WdsName split_wds_name(const std::string& member_name) {
  const auto slash = member_name.rfind('/');
  const size_t base = slash == std::string::npos ? 0 : slash + 1;
  const auto dot = member_name.find('.', base);
  if (dot == std::string::npos) return {member_name, ""};
  std::string ext = member_name.substr(dot + 1);
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return {member_name.substr(0, dot), ext};
}

}  // namespace difftrain::formats
