#include "distributed/launch.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>

#include "core/error.h"

extern char** environ;

namespace longnet::distributed {
namespace {

// The ranks' arguments: argv without the dropped options and their values.
std::vector<std::string> rank_arguments(const SpawnOptions& options, int argc, char** argv) {
  std::vector<std::string> args;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    bool dropped = false;
    for (const std::string& d : options.drop_arguments) {
      if (a == d) {
        ++i;  // and its value
        dropped = true;
      } else if (a.rfind(d + "=", 0) == 0) {
        dropped = true;
      }
    }
    if (!dropped) args.push_back(a);
  }
  return args;
}

// Every line of `text` with the prefix; a partial last line waits in `pending` for the rest.
void write_prefixed(const std::string& prefix, std::string& pending, const char* data, size_t size) {
  pending.append(data, size);
  size_t start = 0;
  for (size_t nl = pending.find('\n'); nl != std::string::npos; nl = pending.find('\n', start)) {
    const std::string line = prefix + pending.substr(start, nl - start + 1);
    (void)!::write(STDOUT_FILENO, line.data(), line.size());
    start = nl + 1;
  }
  pending.erase(0, start);
}

int exit_status(int status) { return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status); }

}  // namespace

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw IoError(std::string("free_port: socket: ") + std::strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  const int error = errno;
  ::close(fd);
  if (!ok) throw IoError(std::string("free_port: no free loopback port: ") + std::strerror(error));
  return ntohs(addr.sin_port);
}

int spawn_local_ranks(const SpawnOptions& options, int argc, char** argv) {
  if (options.nproc < 1) throw ConfigError("--nproc must be >= 1, got " + std::to_string(options.nproc));
  const std::vector<std::string> args = rank_arguments(options, argc, argv);
  const std::string port = std::to_string(free_port());

  // Everything the children need is built before fork: between fork and exec only async-signal-safe calls run.
  std::vector<char*> arg_ptrs;
  for (const std::string& a : args) arg_ptrs.push_back(const_cast<char*>(a.c_str()));
  arg_ptrs.push_back(nullptr);
  std::vector<std::vector<std::string>> envs(static_cast<size_t>(options.nproc));
  std::vector<std::vector<char*>> env_ptrs(static_cast<size_t>(options.nproc));
  for (int rank = 0; rank < options.nproc; ++rank) {
    std::map<std::string, std::string> vars;
    for (char** e = environ; *e != nullptr; ++e) {
      const std::string kv = *e;
      const size_t eq = kv.find('=');
      if (eq != std::string::npos) vars[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
    vars["RANK"] = vars["LOCAL_RANK"] = std::to_string(rank);
    vars["WORLD_SIZE"] = vars["LOCAL_WORLD_SIZE"] = std::to_string(options.nproc);
    vars["MASTER_ADDR"] = "127.0.0.1";
    vars["MASTER_PORT"] = port;
    for (const auto& [k, v] : options.extra) vars[k] = v;
    auto& env = envs[static_cast<size_t>(rank)];
    for (const auto& [k, v] : vars) env.push_back(k + "=" + v);
    for (std::string& kv : env) env_ptrs[static_cast<size_t>(rank)].push_back(kv.data());
    env_ptrs[static_cast<size_t>(rank)].push_back(nullptr);
  }

  struct Child {
    pid_t pid = -1;
    int out = -1;  // read end of its stdout/stderr pipe (ranks > 0), -1 when closed
    std::string pending;
    bool done = false;
  };
  std::vector<Child> children(static_cast<size_t>(options.nproc));
  auto kill_all = [&children] {
    for (Child& c : children) {
      if (c.pid > 0 && !c.done) ::kill(c.pid, SIGKILL);
    }
  };
  for (int rank = 0; rank < options.nproc; ++rank) {
    int pipe_fds[2] = {-1, -1};
    if (rank > 0 && ::pipe(pipe_fds) != 0) {
      kill_all();
      throw IoError(std::string("spawn_local_ranks: pipe: ") + std::strerror(errno));
    }
    const pid_t pid = ::fork();
    if (pid < 0) {
      kill_all();
      throw IoError(std::string("spawn_local_ranks: fork: ") + std::strerror(errno));
    }
    if (pid == 0) {
      if (rank > 0) {
        ::dup2(pipe_fds[1], STDOUT_FILENO);
        ::dup2(pipe_fds[1], STDERR_FILENO);
        ::close(pipe_fds[0]);
        ::close(pipe_fds[1]);
      }
      ::execve("/proc/self/exe", arg_ptrs.data(), env_ptrs[static_cast<size_t>(rank)].data());
      ::_exit(127);
    }
    Child& c = children[static_cast<size_t>(rank)];
    c.pid = pid;
    if (rank > 0) {
      ::close(pipe_fds[1]);
      c.out = pipe_fds[0];
    }
  }

  int result = 0;
  size_t running = children.size();
  while (running > 0) {
    // Forward the output of ranks > 0 while waiting (a full pipe would block them).
    std::vector<pollfd> fds;
    std::vector<size_t> owner;
    for (size_t i = 0; i < children.size(); ++i) {
      if (children[i].out >= 0) {
        fds.push_back({children[i].out, POLLIN, 0});
        owner.push_back(i);
      }
    }
    if (!fds.empty() && ::poll(fds.data(), fds.size(), 200) > 0) {
      for (size_t j = 0; j < fds.size(); ++j) {
        if ((fds[j].revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
        Child& c = children[owner[j]];
        char buffer[4096];
        const ssize_t got = ::read(c.out, buffer, sizeof(buffer));
        if (got > 0) {
          if (!options.quiet_other_ranks) {
            write_prefixed("[rank " + std::to_string(owner[j]) + "] ", c.pending, buffer, static_cast<size_t>(got));
          }
        } else {
          if (!c.pending.empty() && !options.quiet_other_ranks) {
            write_prefixed("[rank " + std::to_string(owner[j]) + "] ", c.pending, "\n", 1);
          }
          ::close(c.out);
          c.out = -1;
        }
      }
    } else if (fds.empty()) {
      ::usleep(100000);
    }
    for (size_t i = 0; i < children.size(); ++i) {
      Child& c = children[i];
      if (c.done) continue;
      int status = 0;
      if (::waitpid(c.pid, &status, WNOHANG) != c.pid) continue;
      c.done = true;
      --running;
      if (exit_status(status) != 0 && result == 0) {
        result = exit_status(status);
        std::fprintf(stderr, "rank %zu of %d failed (%s %d); stopping the other ranks\n", i, options.nproc,
                     WIFEXITED(status) ? "exit status" : "signal",
                     WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
        kill_all();
      }
    }
  }
  // What the ranks wrote just before exiting is still in the pipes.
  for (size_t i = 0; i < children.size(); ++i) {
    Child& c = children[i];
    if (c.out < 0) continue;
    char buffer[4096];
    ssize_t got = 0;
    while ((got = ::read(c.out, buffer, sizeof(buffer))) > 0) {
      if (!options.quiet_other_ranks) {
        write_prefixed("[rank " + std::to_string(i) + "] ", c.pending, buffer, static_cast<size_t>(got));
      }
    }
    if (!c.pending.empty() && !options.quiet_other_ranks) {
      write_prefixed("[rank " + std::to_string(i) + "] ", c.pending, "\n", 1);
    }
    ::close(c.out);
  }
  return result;
}

}  // namespace longnet::distributed
