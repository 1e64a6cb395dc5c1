#!/usr/bin/env python3
"""Run a command in a real pseudo-terminal, type Ctrl-C once its output
matches a pattern, and report what happened as one JSON line:
{"code": exit code or null, "signal": signal number or null, "typed": bool,
 "seconds_after_ctrl_c": float or null, "output": terminal output (latin-1)}.
The Ctrl-C goes through the terminal's line discipline, as a user's does:
if the program has put the terminal in raw mode, no SIGINT is generated.
usage: pty-run.py PATTERN|after:SECONDS|file:PATH TIMEOUT_SECONDS -- COMMAND ARGS..."""
import fcntl, json, os, pty, re, select, struct, sys, termios, time

def main():
    sep = sys.argv.index('--')
    # PATTERN 'after:SECONDS' types Ctrl-C that long after the start instead
    after = float(sys.argv[1][6:]) if sys.argv[1].startswith('after:') else None
    # 'file:PATH' types it once PATH exists and is not empty (the command is under way, whatever the load)
    watch = sys.argv[1][5:] if sys.argv[1].startswith('file:') else None
    pattern = None if after is not None or watch is not None else re.compile(sys.argv[1].encode())
    start = time.time()
    isig = None
    timeout = float(sys.argv[2])
    cmd = sys.argv[sep + 1:]
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(cmd[0], cmd)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))
    out = b''
    typed_at = None
    deadline = time.time() + timeout
    status = None
    while time.time() < deadline:
        r, _, _ = select.select([fd], [], [], 0.05)
        if r:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b''
            if data:
                out += data
        if watch is not None:
            ready = os.path.exists(watch) and os.path.getsize(watch) > 0
        elif pattern is not None:
            ready = pattern.search(out) is not None
        else:
            ready = time.time() >= start + after
        if typed_at is None and ready:
            # the terminal's mode when Ctrl-C is typed: raw mode (ISIG off) swallows it
            isig = bool(termios.tcgetattr(fd)[3] & termios.ISIG)
            os.write(fd, b'\x03')
            typed_at = time.time()
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
    ended = time.time()
    if status is None:
        os.kill(pid, 9)
        _, status = os.waitpid(pid, 0)
        ended = None
    # drain what is left
    try:
        while True:
            r, _, _ = select.select([fd], [], [], 0.05)
            if not r:
                break
            data = os.read(fd, 65536)
            if not data:
                break
            out += data
    except OSError:
        pass
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    print(json.dumps({
        'isig_when_typed': isig, 'code': code, 'signal': sig, 'typed': typed_at is not None, 'timed_out': ended is None,
        'seconds_after_ctrl_c': (ended - typed_at) if (typed_at and ended) else None,
        'output': out.decode('latin-1'),
    }))

main()
