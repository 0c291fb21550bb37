"""The scale benchmark's tables (bench_scale.py measures, this module prints): the figures
of each size and input path, each figure per image with its growth exponent, and the
projected wall time of the handout's 60-epoch run, here and on one GPU on paper."""
import math

MINIPLACES = {'train': 100000, 'val': 10000}
RUN_EPOCHS = 60                        # the handout's run: main.py ../data --epochs=60
MB = 2 ** 20
# One training step of the default CNN at batch 256 on one GPU, on paper (an estimate):
# ResNet-50 (8.2 GFLOPs per 224 px image) trains at about 2,600 images/s on an A100 with
# amp and channels-last (timm's benchmark): 3 x 8.2 GFLOPs x 2,600 = 64 TFLOPS for
# forward and backward. A step of the default CNN is 3 x 0.580 GFLOPs x 256 = 445 GFLOP,
# 7 ms at that rate; taken at half of it (a small network at 128 px keeps a GPU less
# busy than ResNet-50 at 224 px): 15 ms, scaled linearly to other batch sizes. Measure it
# with `benchmark.py step --device cuda --models cnn --batch-size 256`.
GPU_STEP_MS = 15.0

SCALE_HEADER = ['images (train + val)', 'path', 'cache build s', 'cache MB on disk',
                'epoch images/s', 'val pass s', 'main PSS MB', 'worker PSS MB, max',
                'worker private MB, max', 'all PSS MB', 'private copy of the cache']


def split_counts(total):
    """(training, validation) images of a set of `total`: 10 to 1, as MiniPlaces."""
    val = round(total / 11)
    return total - val, val


def cells(values):
    return '| ' + ' | '.join(values) + ' |'


def size_table(results):
    """The table for docs/benchmarks.md: a row per size and path."""
    lines = [cells(SCALE_HEADER), cells(['---'] * 2 + ['---:'] * 8 + ['---'])]
    for r in results:
        for path in ('cached', 'per-image'):
            m, peaks = r[path], r[path]['peaks']
            cached, workers = path == 'cached', bool(peaks.workers)
            lines.append(cells([
                f"{r['total']:,}", path,
                f"{r['build_s']:.1f}" if cached else '',
                f"{r['cache_bytes'] / MB:,.0f}" if cached else '',
                f"{m['images'] / max(m['seconds'], 1e-9):,.0f}", f"{m['val_seconds']:.1f}",
                f'{peaks.main / MB:,.0f}',
                f'{worker_peak(m, PSS) / MB:,.0f}' if workers else 'no workers',
                f'{worker_peak(m, PRIVATE) / MB:,.0f}' if workers else '',
                f'{peaks.total / MB:,.0f}',
                private_copy(r) if cached else '']))
    return lines


PSS, PRIVATE = 0, 1     # the two peaks MemoryPeaks keeps of each worker


def worker_peak(m, which):
    """The highest peak (PSS or PRIVATE bytes) of the workers of a path's figures `m`,
    None where it had no workers."""
    return max((peaks[which] for peaks in m['peaks'].workers.values()), default=None)


def private_copy(r):
    """'yes' when a worker of the cached path holds more private memory than one of the
    per-image path (the same loader with no cache) by half the training cache or more."""
    cached, per_image = worker_peak(r['cached'], PRIVATE), worker_peak(r['per-image'], PRIVATE)
    if cached is None or per_image is None:
        return 'no workers'
    return 'yes' if cached - per_image >= r['train_cache_bytes'] / 2 else 'no'


def growth_figures():
    """(name, the figure of a size's result, its denominator): per image of the set,
    per training image or per validation image."""
    figures = [('cache build, ms', lambda r: 1000 * r['build_s'], 'total'),
               ('cache on disk, KB', lambda r: r['cache_bytes'] / 1024, 'total')]
    for path in ('cached', 'per-image'):
        figures += [(f'{path} epoch, ms per training image',
                     lambda r, p=path: 1000 * r[p]['seconds'], 'train'),
                    (f'{path} validation, ms per validation image',
                     lambda r, p=path: 1000 * r[p]['val_seconds'], 'val')]
    for path in ('cached', 'per-image'):
        figures += [(f'{path}: main PSS, KB', lambda r, p=path: r[p]['peaks'].main / 1024,
                     'total'),
                    (f'{path}: worker PSS (max), KB',
                     lambda r, p=path: (worker_peak(r[p], PSS) or 0) / 1024, 'total'),
                    (f'{path}: worker private (max), KB',
                     lambda r, p=path: (worker_peak(r[p], PRIVATE) or 0) / 1024, 'total'),
                    (f'{path}: all PSS, KB', lambda r, p=path: r[p]['peaks'].total / 1024,
                     'total')]
    return figures


def figure_text(value):
    # three significant digits, never in exponent notation
    return f'{value:,.0f}' if value >= 100 else f'{value:.3g}'


def growth_table(results):
    """Each figure per image at every size, and its growth exponent from the smallest
    size to the largest: log(figure ratio) / log(image ratio); 1 grows with the images,
    0 does not grow."""
    lines = [cells(['figure, per image'] + [f"{r['total']:,} images" for r in results]
                   + ['growth exponent']),
             cells(['---'] + ['---:'] * (len(results) + 1))]
    for name, figure, per in growth_figures():
        counts = [{'total': r['total'], 'train': r['cached']['images'],
                   'val': r['cached']['val_images']}[per] for r in results]
        values = [figure(r) for r in results]
        exponent = ''
        if len(results) > 1 and values[0] > 0 and values[-1] > 0:
            growth = math.log(values[-1] / values[0]) / math.log(counts[-1] / counts[0])
            exponent = f'{growth:.2f}'
        lines.append(cells([name] + [figure_text(v / max(n, 1)) for v, n in zip(values, counts)]
                           + [exponent]))
    return lines


def projection(results, step_s, val_s, args, device):
    """The handout's run, 60 epochs of 100,000 training and 10,000 validation images at
    --batch-size, from the largest size's pipeline rates and the model's times: per
    batch the slower of the model and the pipeline when they overlap, their sum when
    they do not; the cached path adds its caches' build once (scaled to 110,000)."""
    largest = results[-1]
    batches = MINIPLACES['train'] // args.batch_size
    build_s = largest['build_s'] * sum(MINIPLACES.values()) / largest['total']
    gpu_step = args.gpu_step_ms / 1000 * args.batch_size / 256
    gpu_val = gpu_step * 2 / 3 / args.batch_size   # 2 forwards, each a third of a step

    def pipeline(path):                       # (seconds per batch, per validation image)
        m = largest[path]
        return (args.batch_size * m['seconds'] / m['images'],
                m['val_seconds'] / m['val_images'])

    here = f'this machine ({device})'
    cases = [(f'{here}, cached path', step_s, val_s, pipeline('cached'), build_s),
             (f'{here}, per-image path', step_s, val_s, pipeline('per-image'), 0.0),
             ('one GPU on paper, cached path warped on the GPU', gpu_step, gpu_val,
              (0.0, 0.0), build_s),
             ('one GPU on paper, per-image path, this machine as its host', gpu_step,
              gpu_val, pipeline('per-image'), 0.0)]
    lines = [cells(['60-epoch run', 'model ms per batch', 'pipeline ms per batch',
                    'minutes per epoch, overlapped', 'hours, overlapped', 'hours, serial']),
             cells(['---'] + ['---:'] * 5)]
    for name, step, val_image, (pipe, val_pipe), once in cases:
        overlapped = batches * max(step, pipe) + MINIPLACES['val'] * max(val_image, val_pipe)
        serial = batches * (step + pipe) + MINIPLACES['val'] * (val_image + val_pipe)
        lines.append(cells([name, f'{1000 * step:,.0f}', f'{1000 * pipe:,.0f}',
                            f'{overlapped / 60:,.1f}',
                            f'{(RUN_EPOCHS * overlapped + once) / 3600:,.1f}',
                            f'{(RUN_EPOCHS * serial + once) / 3600:,.1f}']))
    return lines


def assumptions(results, args):
    largest = results[-1]['total']
    return [
        f'Assumptions: {RUN_EPOCHS} epochs of {MINIPLACES["train"]:,} training images '
        f'({MINIPLACES["train"] // args.batch_size:,} batches of {args.batch_size}) and '
        f'{MINIPLACES["val"]:,} validation images; pipeline rates of the {largest:,}-image '
        f'size with -j {args.workers}; the cached rows add the caches\' build once.',
        'Overlapped: the workers prepare the next batches while the model steps, so a '
        'batch takes the slower of the two; serial: their sum. On a CPU the workers and '
        'the model share the cores: the real time lies between the two.',
        f'One GPU on paper (an estimate, not a measurement): a training step of '
        f'--gpu-step-ms {args.gpu_step_ms:g} ms at batch 256 (default {GPU_STEP_MS:g}: see '
        f'GPU_STEP_MS in bench_scale_tables.py), scaled linearly to batch {args.batch_size}; '
        f'validation two forward passes of a third of a step each; '
        f'the cached path warps on the GPU (DeviceLoader), its cost taken as hidden by the '
        f'step; the per-image path decodes on this machine\'s cores at the rate measured '
        f'here.']
