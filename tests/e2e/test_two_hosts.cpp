// Two "hosts" on one machine: two network namespaces joined by a veth pair, 10.77.0.1 and
// 10.77.0.2, each running scripts/launch.sh with two ranks (a 2 x 2 job whose rendezvous and
// all-reduce cross the link). Needs root and iproute2 (`ip netns`, `tc`); skips with the reason
// otherwise. The namespaces are this test's own (named after its pid) and deleted afterwards, so
// no traffic leaves them.
#include <sys/stat.h>

#include <cstdlib>
#include <utility>

#include "e2e/train_run.h"
#include "test_paths.h"

namespace difftrain {
namespace {

using namespace test;

constexpr const char* kAddr[2] = {"10.77.0.1", "10.77.0.2"};

std::string find_tool(const char* name) {
  for (const char* dir : {"/usr/sbin/", "/sbin/", "/usr/bin/", "/bin/"})
    if (::access((std::string(dir) + name).c_str(), X_OK) == 0) return std::string(dir) + name;
  return {};
}

class TwoHosts : public TrainRun {
 protected:
  void SetUp() override {
    TrainRun::SetUp();
    if (::geteuid() != 0) GTEST_SKIP() << "needs root for network namespaces (ip netns add)";
    ip_ = find_tool("ip"), tc_ = find_tool("tc");
    if (ip_.empty() || tc_.empty()) GTEST_SKIP() << "needs iproute2 (ip and tc)";
    const std::string id = std::to_string(::getpid());
    for (int h = 0; h < 2; ++h) ns_[h] = "dt" + id + (h ? "b" : "a"), dev_[h] = ns_[h] + "0";  // <= 15 characters
    std::string why;
    if (!sh(ip_ + " netns add " + ns_[0], &why) || !sh(ip_ + " netns add " + ns_[1], &why)) {
      remove_namespaces();
      GTEST_SKIP() << "network namespaces are unavailable: " << why;
    }
    created_ = true;
    bool ok = sh(ip_ + " link add " + dev_[0] + " type veth peer name " + dev_[1], &why);
    for (int h = 0; h < 2 && ok; ++h)
      ok = sh(ip_ + " link set " + dev_[h] + " netns " + ns_[h], &why) &&
           sh(ip_ + " -n " + ns_[h] + " addr add " + kAddr[h] + "/24 dev " + dev_[h], &why) &&
           sh(ip_ + " -n " + ns_[h] + " link set " + dev_[h] + " up", &why) &&
           sh(ip_ + " -n " + ns_[h] + " link set lo up", &why);
    if (!ok) GTEST_SKIP() << "veth pairs are unavailable: " << why;
  }
  void TearDown() override {
    remove_namespaces();
    TrainRun::TearDown();
  }
  void remove_namespaces() {
    for (int h = 0; h < 2; ++h) {
      if (ns_[h].empty()) continue;
      kill_host(h);
      sh(ip_ + " netns del " + ns_[h] + " 2>/dev/null");
    }
  }
  // Runs a shell command; false, with its output in *why, when it fails.
  static bool sh(const std::string& cmd, std::string* why = nullptr) {
    FILE* p = popen((cmd + " 2>&1").c_str(), "r");
    std::string out;
    char buf[512];
    while (p && fgets(buf, sizeof buf, p)) out += buf;
    const int rc = p ? pclose(p) : -1;
    if (rc != 0 && why) *why = cmd + ": " + out;
    return rc == 0;
  }
  // SIGKILL to every process in host h's namespace.
  void kill_host(int h) const {
    if (created_) sh(ip_ + " netns pids " + ns_[h] + " | xargs -r kill -9 2>/dev/null");
  }
  // `command` run on host h (in its namespace), after `prefix` (e.g. faketime).
  std::vector<std::string> on_host(int h, const std::vector<std::string>& command,
                                   const std::vector<std::string>& prefix = {}) const {
    return plus(plus({ip_, "netns", "exec", ns_[h]}, prefix), command);
  }
  // Node h of a 2 x 2 job through launch.sh, the master on host 0.
  std::vector<std::string> node(int h, int port, const std::vector<std::string>& train,
                                const std::vector<std::string>& prefix = {}) const {
    return on_host(
        h,
        plus({source_dir() + "/scripts/launch.sh", "--nproc-per-node", "2", "--nnodes", "2", "--node-rank", std::to_string(h),
              "--master-addr", kAddr[0], "--master-port", std::to_string(port), "--kill-grace", "5", "--"},
             train),
        prefix);
  }
  // Runs both nodes of a job to the end; true when both exit 0.
  bool run_job(const std::string& log, int port, const std::vector<std::string>& train,
               const std::vector<std::string>& prefix_b = {}) {
    const pid_t a = spawn(node(0, port, train), log + "_a");
    const pid_t b = spawn(node(1, port, train, prefix_b), log + "_b");
    const int ra = wait_for(a), rb = wait_for(b);
    EXPECT_EQ(ra, 0) << err(log + "_a");
    EXPECT_EQ(rb, 0) << err(log + "_b");
    return ra == 0 && rb == 0;
  }
  // Starts job `name` on both hosts, loses host B once step 10 is saved (its processes SIGKILLed;
  // with `cut_link` its link is taken down first, so no reset reaches host A) and waits for both.
  // Returns host A's exit code and its seconds from the loss to its exit.
  std::pair<int, double> lose_host_b(const std::string& name, int port, const std::vector<std::string>& train, bool cut_link) {
    const pid_t a = spawn(node(0, port, train), name + "_a");
    const pid_t b = spawn(node(1, port, train), name + "_b");
    if (!wait_for_path(ckpt(name, 10) / "manifest.json", 300)) ADD_FAILURE() << "no step 10: " << err(name + "_a");
    if (cut_link) EXPECT_TRUE(sh(ip_ + " -n " + ns_[1] + " link set " + dev_[1] + " down"));
    kill_host(1);
    const auto lost = std::chrono::steady_clock::now();
    const int code = wait_for(a);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - lost).count();
    wait_for(b);
    if (cut_link) EXPECT_TRUE(sh(ip_ + " -n " + ns_[1] + " link set " + dev_[1] + " up"));
    return {code, secs};
  }
  // Shapes both directions of the link with tbf: `rate` bytes/s, a bucket of `burst` bytes.
  void shape_link(double rate, double burst) const {
    for (int h = 0; h < 2; ++h) {
      std::string why;
      ASSERT_TRUE(sh(ip_ + " netns exec " + ns_[h] + " " + tc_ + " qdisc add dev " + dev_[h] + " root tbf rate " +
                         std::to_string(static_cast<int64_t>(rate * 8)) + "bit burst " +
                         std::to_string(static_cast<int64_t>(burst)) + " latency 10s",
                     &why))
          << why;
    }
  }
  // S: the bytes of one gradient all-reduce, the trainable weights in fp32.
  static double gradient_bytes(const fs::path& ckpt) {
    size_t bytes = 0;
    for (const auto& [name, values] : read_safetensors_f32(ckpt / "model.safetensors")) bytes += 4 * values.size();
    return static_cast<double>(bytes);
  }
  // The values of one metrics.jsonl key, in order.
  std::vector<double> metric(const std::string& run, const std::string& key) const {
    std::vector<double> out;
    std::ifstream in(dir_ / run / "metrics.jsonl");
    for (std::string line; std::getline(in, line);)
      if (const auto j = json::parse(line); j.contains(key)) out.push_back(j[key].get<double>());
    return out;
  }

  std::string ip_, tc_, ns_[2], dev_[2];
  bool created_ = false;
};

// A 2 x 2 job across the link with per-rank batch 4 trains the same weights as one process with
// batch 16 (within 1e-4 after 20 AdamW steps of lr 1e-3: Distributed.TwoRanksEqualOneRankWithTheGlobalBatch
// has the argument), and reports the gradient all-reduce time. Then the link is shaped with tbf
// (this kernel has no netem) to rate R bytes/s and burst b in each direction. Every all-reduce must
// move host A's S gradient bytes (incompressible floats) to host B and B's to A, so rank 0's
// all-reduce lasts at least (S - b) / R: the bucket holds at most b bytes when it starts, and B's
// data for a step is ready only when B's backward ends, which is when rank 0's does (the ranks
// start each step together, after the previous all-reduce; 20% margin for that skew).
TEST_F(TwoHosts, TwoByTwoAcrossTheLinkEqualsOneProcessAndReportsItsAllReduceTime) {
  const auto common = std::vector<std::string>{"--set", "logging.sample_every=0", "--set", "sampling.num_final_samples=0"};
  ASSERT_EQ(run(args("one", 20, plus(common, {"--set", "train.batch_size=16"})), "one"), 0) << err("one");
  ASSERT_TRUE(run_job("x", rendezvous_port(0), args("x", 20, plus(common, {"--set", "train.batch_size=4"}))));
  EXPECT_NE(err("x_a").find("4 ranks"), std::string::npos) << err("x_a");
  EXPECT_LT(max_weight_difference(ckpt("one", 20), ckpt("x", 20)), 1e-4) << "2 x 2 across the link vs 1 x 16";
  const auto plain = metric("x", "train/allreduce_ms_per_step");
  ASSERT_EQ(plain.size(), 4u) << "one value per log interval (logging.log_every = 5)";
  for (double ms : plain) EXPECT_GT(ms, 0);

  const double bytes = gradient_bytes(ckpt("x", 20));
  const double rate = bytes / 0.4, burst = 64 << 10;  // (S - b) / R is about 0.35 s
  shape_link(rate, burst);
  ASSERT_TRUE(run_job("shaped", rendezvous_port(1), args("shaped", 10, plus(common, {"--set", "train.batch_size=4"}))));
  const double bound_ms = (bytes - burst) / rate * 1e3;
  const auto shaped = metric("shaped", "train/allreduce_ms_per_step");
  ASSERT_EQ(shaped.size(), 2u);
  for (double ms : shaped)
    EXPECT_GT(ms, 0.8 * bound_ms) << "S = " << bytes << " bytes at " << rate << " bytes/s; unshaped " << plain[0] << " ms";
  std::cout << "all-reduce of " << bytes << " bytes: " << plain.back() << " ms per step on the veth link, " << shaped.back()
            << " ms with tbf at " << rate / 1e6 << " MB/s (bound " << bound_ms << " ms)\n";
}

// When every process of host B is killed, host A's ranks fail their all-reduce (the link is up:
// the kernel resets the dead ranks' connections) and its launcher exits non-zero, naming the
// failure, well within distributed.timeout_s; both hosts restarted with --resume latest end with
// the weights, optimizer and generator states of an uninterrupted job, bit for bit. The same when
// host B's link is cut before its processes die (below).
TEST_F(TwoHosts, ALostHostFailsTheOtherWithinTheTimeoutAndResumeIsBitExact) {
  const auto train = [&](const std::string& name, std::vector<std::string> extra = {}) {
    return args(name, 30,
                plus({"--set", "train.batch_size=4", "--set", "logging.sample_every=0", "--set", "sampling.num_final_samples=0",
                      "--set", "distributed.timeout_s=30"},
                     extra));
  };
  ASSERT_TRUE(run_job("straight", rendezvous_port(0), train("straight")));
  shape_link(gradient_bytes(ckpt("straight", 30)) / 0.2, 64 << 10);  // >= 0.15 s a step: time to kill after step 10

  const auto [code, secs] = lose_host_b("k", rendezvous_port(1), train("k"), false);
  EXPECT_NE(code, 0) << err("k_a");
  EXPECT_LT(secs, 30 * time_scale()) << "host A must give up within distributed.timeout_s = 30 s";
  std::cout << "host A exited " << code << " " << secs << " s after host B was killed\n";
  EXPECT_NE(err("k_a").find("failed with exit code"), std::string::npos) << err("k_a");
  EXPECT_NE(err("k_a").find("distributed"), std::string::npos) << err("k_a");
  ASSERT_FALSE(fs::exists(ckpt("k", 30))) << "the job ended before the kill";

  // A host that vanishes without closing its connections (its link cut first, then its processes
  // killed, so no reset reaches host A) is noticed through the timeout alone: host A still exits
  // non-zero within distributed.timeout_s (20 s here) and a few seconds for the launcher.
  const auto [cut_code, cut_secs] = lose_host_b("c", rendezvous_port(3), train("c", {"--set", "distributed.timeout_s=20"}), true);
  EXPECT_NE(cut_code, 0) << err("c_a");
  EXPECT_LT(cut_secs, 20 + 10 * time_scale()) << err("c_a");
  EXPECT_NE(err("c_a").find("distributed.timeout_s = 20"), std::string::npos) << err("c_a");
  std::cout << "host A exited " << cut_code << " " << cut_secs << " s after host B's link was cut\n";

  ASSERT_TRUE(run_job("resumed", rendezvous_port(2), train("k", {"--resume", "latest"})));
  EXPECT_NE(err("resumed_a").find("resumed from"), std::string::npos) << err("resumed_a");
  EXPECT_EQ(digests(ckpt("k", 30)), digests(ckpt("straight", 30)));
}

// A rank whose MASTER_ADDR:MASTER_PORT has no listener (the address answers, the port is closed)
// exits with code 2 and a message naming the address, not a hang. LibTorch's TCPStore client
// bounds it: it retries refused connects until T = distributed.timeout_s, sleeping between them
// by ExponentialBackoffWithJitter (c10d/Backoff.hpp: 0.5 s × 1.5^k, ±50%); once T has passed it
// sleeps once more and tries one last time for up to T. The sleeps of the first T add up to T,
// so the last interval is at most 2T/3 (all drawn at -50%) and the next sleep at most 1.5 × 1.5
// × 2T/3 = 1.5T: 3.5T in all (28 s measured once with T = 10, 11.7 s another time). A
// host whose clock is three hours ahead (libfaketime, both wall and monotonic clocks) trains the
// same weights bit for bit: nothing in the rendezvous or the collectives compares clocks across
// hosts (each timeout is measured on its own host's steady clock). Host B of the reference job
// binds Gloo to the interface GLOO_SOCKET_IFNAME names, host A to its route to the master.
TEST_F(TwoHosts, AClosedMasterPortIsAClearErrorAndASkewedClockChangesNothing) {
  const auto one_rank = args("closed", 10, {"--set", "distributed.timeout_s=10"});
  const auto start = std::chrono::steady_clock::now();
  const int code =
      run(on_host(1, plus({"env", "RANK=1", "LOCAL_RANK=0", "WORLD_SIZE=2", "LOCAL_WORLD_SIZE=1",
                           std::string("MASTER_ADDR=") + kAddr[0], "MASTER_PORT=" + std::to_string(rendezvous_port(3))},
                          one_rank)),
          "closed");
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(code, 2) << err("closed");
  EXPECT_LT(secs, 3.5 * 10 + 15 * time_scale()) << err("closed");  // TCPStore's bound (above), and the start-up
  std::cout << "closed master port: exit " << code << " after " << secs << " s\n";
  EXPECT_NE(
      err("closed").find(std::string("cannot reach the TCPStore at ") + kAddr[0] + ":" + std::to_string(rendezvous_port(3))),
      std::string::npos)
      << err("closed");

  const std::string faketime = find_tool("faketime");
  if (faketime.empty()) GTEST_SKIP() << "no faketime (Debian's faketime package) for the clock-skew check";
  if (sanitizer() == "tsan") GTEST_SKIP() << "libfaketime's pthread wrappers bypass TSan's interceptors (false lock reports)";
  const auto train = [&](const std::string& name) {
    return args(name, 10,
                {"--set", "train.batch_size=4", "--set", "logging.sample_every=0", "--set", "sampling.num_final_samples=0",
                 "--set", "distributed.timeout_s=60"});
  };
  // Host B names its interface (GLOO_SOCKET_IFNAME, as torch.distributed reads it); A finds its own.
  ASSERT_TRUE(run_job("same", rendezvous_port(4), train("same"), {"env", "GLOO_SOCKET_IFNAME=" + dev_[1]}));
  ASSERT_TRUE(run_job("skewed", rendezvous_port(5), train("skewed"), {faketime, "-f", "+3h"}));
  EXPECT_EQ(digests(ckpt("skewed", 10)), digests(ckpt("same", 10)));
}

}  // namespace
}  // namespace difftrain
