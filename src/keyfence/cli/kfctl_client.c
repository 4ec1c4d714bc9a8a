/* kfctl's installed command: a call to the caller's warm kfctl server.
 *
 * keyfence.cli.launcher compiles this file with KFCTL_FALLBACK defined as
 * the path of the Python launcher (python -IS, keyfence.cli.kfctl).  The
 * protocol, the checks and why they are enough: keyfence/cli/kfctl_warm.py
 * and docs/security.md ("kfctl's warm server").  In short:
 *
 *   1. connect to the warm server's socket (SOCK_SEQPACKET); its
 *      SO_PEERCRED must be our uid and gid, and /proc must show it with
 *      exactly our credentials, capabilities, no_new_privs, seccomp mode,
 *      namespaces and root: a process no more and no less privileged than
 *      we are.  Anything else, and the Python launcher runs instead;
 *   2. send argv, environ, umask and the descriptors 0, 1, 2 and our
 *      working directory; the server forks a worker that runs kfctl's
 *      main() as we would;
 *   3. when the worker needs the daemon, it sends a socket path: we
 *      connect() to it ourselves and pass the connection over, so that the
 *      daemon sees *this* process (its @s, @p and any request-key
 *      authority), exactly as if kfctl had run here;
 *   4. the server sends the worker's wait status and we leave with it (or
 *      die of its signal).  SIGINT, SIGTERM, SIGHUP and SIGQUIT received
 *      meanwhile are passed to the worker.
 *
 * KEYFENCE_KFCTL_WARM=0 runs the Python launcher at once; "require" fails
 * when no trusted server answers rather than falling back (tests and
 * benchmarks; a call the server declines still runs in Python).  This program never
 * writes to stdout; its own errors start with "kfctl:" on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef KFCTL_FALLBACK
#error "KFCTL_FALLBACK: the Python launcher's path (keyfence.cli.launcher defines it)"
#endif

extern char **environ;

#define CALL_MAX (192 * 1024) /* the server reads at most this much */
#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77 /* Linux 6.5 */
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#define STATUS_LINES 11

static const char *const status_lines[STATUS_LINES] = {
    "Uid:", "Gid:", "Groups:", "CapInh:", "CapPrm:", "CapEff:",
    "CapBnd:", "CapAmb:", "NoNewPrivs:", "Seccomp:", "Seccomp_filters:",
};
static const char *const namespaces[] = {"user", "mnt", "pid", "ipc", "uts", "net", "cgroup"};

static volatile sig_atomic_t worker_pid;
static volatile sig_atomic_t pending_signal;
static int required; /* KEYFENCE_KFCTL_WARM=require */
static char *const *saved_argv;

/* Before Python starts.  A closed standard descriptor would be the next
 * socket's number (the daemon connection: kfctl's answer, or a key's
 * payload from `pipe`, written into it), so each gets /dev/null opened the
 * way that keeps using it failing EBADF, as keyctl's would: 0 write-only,
 * 1 and 2 read-only.  And Python refuses to start at all with a directory
 * on stdin: it waits at a higher descriptor, named in KEYFENCE_KFCTL_STDIN,
 * and the Python launcher puts it back (keyfence.cli.launcher). */
static void standard_descriptors_for_python(void)
{
    struct stat st;
    char number[16];
    int i, fd;

    for (i = 0; i < 3; i++)
        if (fcntl(i, F_GETFD) < 0)
            (void)open("/dev/null", i == 0 ? O_WRONLY : O_RDONLY); /* the lowest: i */
    if (fstat(0, &st) == 0 && S_ISDIR(st.st_mode)) {
        fd = fcntl(0, F_DUPFD, 3);
        if (fd < 0)
            return;
        snprintf(number, sizeof number, "%d", fd);
        setenv("KEYFENCE_KFCTL_STDIN", number, 1);
        i = open("/dev/null", O_WRONLY);
        if (i >= 0 && i != 0) {
            dup2(i, 0);
            close(i);
        }
    }
}

static void fall_back(const char *why, const char *start_at)
{
    if (required) {
        dprintf(2, "kfctl: no warm server: %s\n", why);
        _exit(1);
    }
    standard_descriptors_for_python();
    if (saved_argv[0] != NULL)
        setenv("KEYFENCE_KFCTL_ARGV0", saved_argv[0], 1);
    if (start_at != NULL)
        setenv("KEYFENCE_KFCTL_WARM_START", start_at, 1);
    execv(KFCTL_FALLBACK, saved_argv);
    dprintf(2, "kfctl: cannot run %s: %s\n", KFCTL_FALLBACK, strerror(errno));
    _exit(1);
}

/* The warm server's socket: $KEYFENCE_KFCTL_SOCKET, else kfctl.sock in the
 * per-user keyfence directory (keyfence.paths.warm_socket says the same). */
static int warm_socket_path(char *out, size_t size)
{
    const char *env = getenv("KEYFENCE_KFCTL_SOCKET");
    const char *runtime = getenv("XDG_RUNTIME_DIR");
    char logind[64];
    struct stat st;
    int n;

    if (env != NULL && *env != '\0')
        n = snprintf(out, size, "%s", env);
    else {
        if (runtime == NULL || *runtime != '/') { /* unset, or relative: invalid (XDG) */
            snprintf(logind, sizeof logind, "/run/user/%u", (unsigned)geteuid());
            runtime = (stat(logind, &st) == 0 && S_ISDIR(st.st_mode)) ? logind : NULL;
        }
        if (runtime != NULL) {
            size_t len = strlen(runtime);
            const char *sep = (len > 0 && runtime[len - 1] == '/') ? "" : "/";
            n = snprintf(out, size, "%s%skeyfence/kfctl.sock", runtime, sep);
        } else
            n = snprintf(out, size, "/tmp/keyfence-%u/kfctl.sock", (unsigned)geteuid());
    }
    return n > 0 && (size_t)n < size ? 0 : -1;
}

static ssize_t read_file(const char *path, char *buf, size_t size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    size_t got = 0;
    ssize_t n;

    if (fd < 0)
        return -1;
    while (got < size - 1 && (n = read(fd, buf + got, size - 1 - got)) != 0) {
        if (n < 0) {
            if (errno == EINTR)
                continue;
            close(fd);
            return -1;
        }
        got += (size_t)n;
    }
    close(fd);
    buf[got] = '\0';
    return (ssize_t)got;
}

/* The line of /proc/PID/status that starts with `name`, up to its newline. */
static const char *status_line(const char *status, const char *name, size_t *len)
{
    size_t name_len = strlen(name);
    const char *p = status;

    while (p != NULL && *p != '\0') {
        if (strncmp(p, name, name_len) == 0) {
            const char *end = strchr(p, '\n');
            *len = end != NULL ? (size_t)(end - p) : strlen(p);
            return p;
        }
        p = strchr(p, '\n');
        if (p != NULL)
            p++;
    }
    *len = 0;
    return NULL;
}

static int same_file(const char *a, const char *b)
{
    struct stat sa, sb;

    if (stat(a, &sa) != 0 || stat(b, &sb) != 0)
        return 0;
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

/* 1 if process `pid` has exactly our credentials and confinement. */
static int same_rights(pid_t pid)
{
    char mine[8192], theirs[8192], a[64], b[64];
    size_t i;

    snprintf(a, sizeof a, "/proc/%d/status", (int)pid);
    if (read_file("/proc/self/status", mine, sizeof mine) < 0 ||
        read_file(a, theirs, sizeof theirs) < 0)
        return 0;
    for (i = 0; i < STATUS_LINES; i++) {
        size_t la, lb;
        const char *x = status_line(mine, status_lines[i], &la);
        const char *y = status_line(theirs, status_lines[i], &lb);
        if ((x == NULL) != (y == NULL) || la != lb || (x != NULL && memcmp(x, y, la) != 0))
            return 0;
    }
    for (i = 0; i < sizeof namespaces / sizeof namespaces[0]; i++) {
        snprintf(a, sizeof a, "/proc/self/ns/%s", namespaces[i]);
        snprintf(b, sizeof b, "/proc/%d/ns/%s", (int)pid, namespaces[i]);
        if (!same_file(a, b))
            return 0;
    }
    snprintf(b, sizeof b, "/proc/%d/root", (int)pid);
    return same_file("/proc/self/root", b);
}

/* same_rights() of the process that made the server's socket, not of one
 * that has its pid since (the socket passed on, its maker gone): /proc is
 * read by pid, so that process must still be alive afterwards, as its pidfd
 * says (SO_PEERPIDFD; before Linux 6.5 a pidfd opened first). */
static int server_is_as_we_are(int sock, pid_t pid)
{
    int pidfd = -1, ok;
    socklen_t len = sizeof pidfd;

    if (getsockopt(sock, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &len) != 0) {
        if (errno != ENOPROTOOPT)
            return 0; /* ESRCH: its maker has gone, the pid may be another's */
        pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    }
    if (pidfd < 0)
        return 0;
    ok = same_rights(pid) && syscall(SYS_pidfd_send_signal, pidfd, 0, NULL, 0) == 0;
    close(pidfd);
    return ok;
}

static void on_signal(int sig)
{
    int saved = errno;
    if (worker_pid > 0)
        kill((pid_t)worker_pid, sig);
    else
        pending_signal = sig;
    errno = saved;
}

static void forward_signals(void)
{
    static const int signals[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT};
    struct sigaction sa;
    size_t i;

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    for (i = 0; i < sizeof signals / sizeof signals[0]; i++) {
        struct sigaction old;
        /* a signal the caller ignores (nohup) stays ignored */
        if (sigaction(signals[i], NULL, &old) == 0 && old.sa_handler == SIG_IGN)
            continue;
        sigaction(signals[i], &sa, NULL);
    }
}

static int send_with_fds(int sock, const void *data, size_t len, const int *fds, size_t nfds)
{
    char control[CMSG_SPACE(sizeof(int) * 4)];
    struct iovec iov = {(void *)data, len};
    struct msghdr msg;
    struct cmsghdr *cmsg;

    memset(&msg, 0, sizeof msg);
    memset(control, 0, sizeof control);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (nfds > 0) {
        msg.msg_control = control;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * nfds);
    }
    for (;;) {
        ssize_t n = sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (n >= 0)
            return 0;
        if (errno != EINTR)
            return -1;
    }
}

static int put(char *buf, size_t *at, const void *data, size_t len)
{
    if (*at + len > CALL_MAX)
        return -1;
    memcpy(buf + *at, data, len);
    *at += len;
    return 0;
}

static int put_u32(char *buf, size_t *at, uint32_t value)
{
    return put(buf, at, &value, sizeof value);
}

/* The call: "KFW1", argc, envc, umask (native u32s), then argv and environ as
 * NUL-terminated strings; descriptors 0, 1, 2 and the working directory. */
static int send_call(int sock, char *const *argv)
{
    static char buf[CALL_MAX];
    size_t at = 0;
    uint32_t argc = 0, envc = 0;
    mode_t mask = umask(0);
    int fds[4] = {0, 1, 2, -1};
    char *const *p;
    int rc;

    umask(mask);
    for (p = argv; *p != NULL; p++)
        argc++;
    for (p = environ; *p != NULL; p++)
        envc++;
    if (put(buf, &at, "KFW1", 4) || put_u32(buf, &at, argc) || put_u32(buf, &at, envc) ||
        put_u32(buf, &at, (uint32_t)mask))
        return -1;
    for (p = argv; *p != NULL; p++)
        if (put(buf, &at, *p, strlen(*p) + 1))
            return -1;
    for (p = environ; *p != NULL; p++)
        if (put(buf, &at, *p, strlen(*p) + 1))
            return -1;
    fds[3] = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fds[3] < 0)
        return -1;
    rc = send_with_fds(sock, buf, at, fds, 4);
    close(fds[3]);
    return rc;
}

/* The worker asks for the daemon at `path`: connect here, pass it over. */
static int answer_connect(int sock, const char *path)
{
    struct sockaddr_un addr;
    int fd, err = 0;
    char reply[1 + sizeof(int32_t)];

    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof addr.sun_path)
        err = ENAMETOOLONG;
    else {
        strcpy(addr.sun_path, path);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            err = errno;
        else {
            while (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
                if (errno != EINTR) {
                    err = errno;
                    break;
                }
            }
            if (err == 0) {
                /* our copy goes: the daemon sees the connection close when
                 * the worker has finished with it (or died) */
                int rc = send_with_fds(sock, "D", 1, &fd, 1);
                close(fd);
                return rc;
            }
            close(fd);
        }
    }
    reply[0] = 'E';
    memcpy(reply + 1, &(int32_t){err}, sizeof(int32_t));
    return send_with_fds(sock, reply, sizeof reply, NULL, 0);
}

static void leave_with(int status)
{
    if (WIFEXITED(status))
        _exit(WEXITSTATUS(status));
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        sigset_t set;
        signal(sig, SIG_DFL);
        sigemptyset(&set);
        sigaddset(&set, sig);
        sigprocmask(SIG_UNBLOCK, &set, NULL);
        raise(sig);
    }
    _exit(1);
}

int main(int argc, char **argv)
{
    const char *mode = getenv("KEYFENCE_KFCTL_WARM");
    const char *no_autostart = getenv("KEYFENCE_NO_AUTOSTART");
    char path[4096], buf[4096 + 8];
    struct sockaddr_un addr;
    struct ucred peer;
    socklen_t peer_len = sizeof peer;
    int sock, i, started = 0, autostart;
    int32_t value;

    (void)argc;
    saved_argv = argv;
    required = mode != NULL && strcmp(mode, "require") == 0;
    if (mode != NULL && strcmp(mode, "0") == 0)
        fall_back("KEYFENCE_KFCTL_WARM=0", NULL);
    /* calls no worker can make as we would: Python, required or not */
    if (getuid() != geteuid() || getgid() != getegid()) {
        required = 0;
        fall_back("set-id", NULL);
    }
    for (i = 0; i < 3; i++)
        if (fcntl(i, F_GETFD) < 0) {
            required = 0;
            fall_back("a standard descriptor is closed", NULL);
        }
    if (warm_socket_path(path, sizeof path) != 0 || strlen(path) >= sizeof addr.sun_path)
        fall_back("socket path too long", NULL);

    autostart = !(no_autostart != NULL &&
                  (!strcmp(no_autostart, "1") || !strcmp(no_autostart, "yes") ||
                   !strcmp(no_autostart, "true")));
    sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (sock < 0)
        fall_back(strerror(errno), NULL);
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    strcpy(addr.sun_path, path);
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0) {
        int err = errno;
        close(sock);
        /* none there: this call runs in Python, which starts one after it */
        fall_back(strerror(err), (err == ENOENT || err == ECONNREFUSED) && autostart ? path : NULL);
    }
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &peer, &peer_len) != 0 ||
        peer.uid != geteuid() || peer.gid != getegid() || !server_is_as_we_are(sock, peer.pid)) {
        close(sock);
        fall_back("the server is not ours", NULL);
    }
    forward_signals();
    if (send_call(sock, argv) != 0) {
        close(sock);
        fall_back("cannot send the call", NULL);
    }
    for (;;) {
        ssize_t n = recv(sock, buf, sizeof buf - 1, 0);
        if (n < 0) {
            if (errno == EINTR) {
                if (pending_signal != 0 && worker_pid > 0) {
                    kill((pid_t)worker_pid, pending_signal);
                    pending_signal = 0;
                }
                continue;
            }
            n = 0;
        }
        if (n == 0) {
            if (!started) /* nothing ran: the same call in Python */
                fall_back("the server went away", NULL);
            dprintf(2, "kfctl: the warm server went away (worker %d)\n", (int)worker_pid);
            _exit(1);
        }
        buf[n] = '\0';
        switch (buf[0]) {
        case 'P': /* the worker's pid: it starts now */
            if (n != 1 + (ssize_t)sizeof(int32_t))
                break;
            started = 1;
            memcpy(&value, buf + 1, sizeof value);
            worker_pid = value;
            if (pending_signal != 0) {
                kill((pid_t)worker_pid, pending_signal);
                pending_signal = 0;
            }
            break;
        case 'C': /* connect to the daemon at this path */
            if (answer_connect(sock, buf + 1) != 0) {
                dprintf(2, "kfctl: lost the warm server\n");
                _exit(1);
            }
            break;
        case 'F': /* the worker did nothing: run in Python (even when required) */
            close(sock);
            required = 0;
            fall_back(n > 1 ? buf + 1 : "the server declined", NULL);
            break;
        case 'X': /* the worker's wait status */
            if (n != 1 + (ssize_t)sizeof(int32_t))
                break;
            memcpy(&value, buf + 1, sizeof value);
            leave_with(value);
            break;
        default:
            break;
        }
    }
}
