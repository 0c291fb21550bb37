"""The shared-cores benchmark: one training process alone, then two at once on the same
cores, with OpenMP's threads spinning while they wait (libgomp's default) and waiting
passively (what main.py sets). A run should slow down in proportion to the cores it
shares (about 2x for two runs), not 5-10x.

Each process is this file run as a script: it times `steps` training steps of a model
(after 2 warm-up steps) at batch `batch` on random 128 x 128 images, channels-last fp32,
and prints its ms per step. The processes start their timed steps together: each says
when it is warm, and the parent lets them go once all are (their start-up takes longer
than the timed steps).
"""
import os
import subprocess
import sys
import time

if __name__ == '__main__':   # run as a script (its own child process): tools/ on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _paths  # noqa: E402,F401  code/ and tools/ on sys.path
import student_code as sc  # noqa: E402

MODELS = {**sc.cnn_models, **sc.vit_models}
WAIT_POLICIES = {'spin': None, 'passive': 'PASSIVE'}   # None: OMP_WAIT_POLICY unset


def child_command(model, batch, steps):
    return [sys.executable, os.path.abspath(__file__), model, str(batch), str(steps)]


def run_processes(count, policy, model, batch, steps):
    """Start `count` processes, let them time their steps together; returns each one's
    ms per step."""
    env = {k: v for k, v in os.environ.items() if k != 'OMP_WAIT_POLICY'}
    if WAIT_POLICIES[policy] is not None:
        env['OMP_WAIT_POLICY'] = WAIT_POLICIES[policy]
    procs = [subprocess.Popen(child_command(model, batch, steps), env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
             for _ in range(count)]
    try:
        return timed_together(procs)
    finally:                                 # Ctrl-C or an error: no child outlives us
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def timed_together(procs):
    """Let the started processes time their steps together; each one's ms per step."""
    for proc in procs:                       # each says 'warm' after its warm-up steps
        proc.stdout.readline()
    for proc in procs:                       # then all go at once
        proc.stdin.write('go\n')
        proc.stdin.flush()
    times = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode == 130:           # Ctrl-C reached the child first
            raise KeyboardInterrupt
        if proc.returncode != 0:
            raise SystemExit(f'benchmark.py shared: error: a timed process failed '
                             f'(exit {proc.returncode}; its error is above)')
        times.append(float(out.split()[-1]))
    return times


def bench_shared(args):
    """One process alone, then two at once, with OpenMP threads that spin and that wait
    passively: ms per training step and each run's slowdown over its time alone (two runs
    on the same cores should cost about 2x)."""
    steps = 2 if args.quick else args.steps
    print(f'shared: {os.cpu_count()} cores, model {args.model}, batch {args.batch_size}, '
          f'{steps} timed steps per process')
    for policy in args.policies:
        start = time.time()
        alone = run_processes(1, policy, args.model, args.batch_size, steps)[0]
        pair = run_processes(2, policy, args.model, args.batch_size, steps)
        slowdown = ' / '.join(f'{t / alone:.2f}x' for t in pair)
        print(f'  {policy:8s} alone {alone:7.0f} ms/step | two at once '
              f'{" / ".join(f"{t:.0f}" for t in pair)} ms/step ({slowdown}) '
              f'[{time.time() - start:.0f} s]', flush=True)


def time_steps(model_name, batch, steps):
    """The child: ms per training step of model_name (SGD, channels-last, fp32)."""
    import torch
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = MODELS[model_name](num_classes=10).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9)
    x = torch.randn(batch, 3, 128, 128).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for _ in range(2):
        step()
    print('warm', flush=True)
    sys.stdin.readline()                     # the parent's go
    start = time.perf_counter()
    for _ in range(steps):
        step()
    print(f'ms/step {(time.perf_counter() - start) / steps * 1000:.1f}')


def child_main(argv):
    """A timed process: MODEL BATCH STEPS. Ctrl-C reaches every process of the terminal;
    the parent says it, a child exits 130 without a traceback of its own."""
    try:
        time_steps(argv[0], int(argv[1]), int(argv[2]))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == '__main__':
    child_main(sys.argv[1:])
