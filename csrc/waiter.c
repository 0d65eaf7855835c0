/* The detached supervisor while its container runs, in C: waiter.py's "wait" mode in ~0.3 MB
 * instead of a Python interpreter's ~3.6 MB.
 *
 *     _waiter PID FDS -- PROGRAM ARG...
 *
 * exec'd by the supervisor in its own place (same pid, the init PID still its child, the
 * forwarded signals blocked across the exec so that none is lost). It forwards those signals to
 * PID, waits for it, then execs PROGRAM ARG... CODE (CODE: PID's exit status as a shell reports
 * it), which is waiter.py's "resume": the launcher releases or restarts the container.
 * FDS (comma-separated, may be empty): the host ports a bridge's -p holds, kept open while the
 * container runs and closed by the exec to resume, whose release would otherwise find them taken.
 * unionfs/launcher/waiter.py is its twin and the reference, used where this one is not built.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

/* waiter.FORWARDED (process.FORWARDED). */
static const int forwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
#define NFORWARDED (sizeof forwarded / sizeof forwarded[0])

static volatile pid_t child;

static void forward(int sig)
{
    int saved = errno;
    kill(child, sig);       /* ESRCH once it is gone: nothing to pass on */
    errno = saved;
}

static int die(const char *what)
{
    fprintf(stderr, "unionrun: waiter: %s: %s\n", what, strerror(errno));
    return 125;
}

static int usage(const char *prog)
{
    fprintf(stderr, "usage: %s PID FDS -- PROGRAM ARG...\n", prog);
    return 125;
}

int main(int argc, char **argv)
{
    if (argc < 5 || strcmp(argv[3], "--") != 0)
        return usage(argv[0]);
    char *end;
    long pid = strtol(argv[1], &end, 10);
    if (*end || pid <= 0)
        return usage(argv[0]);
    child = (pid_t)pid;
    for (char *p = argv[2]; *p;) {
        long fd = strtol(p, &end, 10);
        if (end == p || (*end && *end != ','))
            return usage(argv[0]);
        fcntl((int)fd, F_SETFD, FD_CLOEXEC);
        p = *end ? end + 1 : end;
    }

    sigset_t set;
    sigemptyset(&set);
    for (size_t i = 0; i < NFORWARDED; i++)
        sigaddset(&set, forwarded[i]);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = forward;
    sa.sa_flags = SA_RESTART;
    sigfillset(&sa.sa_mask);
    for (size_t i = 0; i < NFORWARDED; i++)
        if (sigaction(forwarded[i], &sa, NULL) != 0)
            return die("sigaction");
    /* Blocked since before the exec: what arrived meanwhile is forwarded now. */
    sigprocmask(SIG_UNBLOCK, &set, NULL);

    int status;
    while (waitpid(child, &status, 0) < 0)
        if (errno != EINTR)
            return die("waitpid");
    int code = WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);

    /* Blocked again across the exec to resume, which forwards (or handles) them itself. */
    sigprocmask(SIG_BLOCK, &set, NULL);
    char codearg[16];
    snprintf(codearg, sizeof codearg, "%d", code);
    int n = argc - 4;
    char **args = calloc((size_t)n + 2, sizeof *args);
    if (!args)
        return die("calloc");
    memcpy(args, argv + 4, (size_t)n * sizeof *args);
    args[n] = codearg;
    /* As waiter.become: every path of ours is absolute, and `python -m` puts the working
     * directory first on sys.path. */
    if (chdir("/") != 0)
        return die("chdir /");
    execv(args[0], args);
    return die(args[0]);
}
