"""The speed benchmarks: step (a training step per speed setting) and pipeline (input images/s).

Both time variants side by side in one process, interleaved, as the Part benchmarks do;
they measure what main.py's speed defaults and its cached input path rest on.
"""
import itertools
import os
from statistics import median

from benchmarks.bench_timing import interleaved_times

from _paths import REPO


def bench_step(args):
    """One training step (forward, loss, backward, SGD) of each model at 128 x 128, in fp32,
    channels-last, amp (bf16 on a CPU or a bf16 GPU, else fp16) and amp + channels-last,
    interleaved in one process; median ms and the speed-up over fp32. Behind main.py's
    auto defaults (auto_speed_settings): the data pipeline is left out."""
    import torch
    import torch.nn as nn
    import student_code as sc
    from toolkit.speed import amp_dtype_for
    device = torch.device(args.device)
    dtype = getattr(torch, amp_dtype_for(device))
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 128, 128, device=device)
    y = torch.randint(0, 100, (args.batch_size,), device=device)
    builders = {'simplenet': lambda: sc.cnn_models['simplenet'](num_classes=100),
                'cnn': lambda: sc.default_cnn_model(num_classes=100),
                'vit': lambda: sc.default_vit_model(num_classes=100)}
    print(f"step: torch {torch.__version__}, {device}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, amp = {dtype}, median of {args.repeats} "
          f"interleaved steps (ms)")
    for name in args.models:
        fns = {}
        for amp, cl in itertools.product((False, True), (False, True)):
            fmt = torch.channels_last if cl else torch.contiguous_format
            model = builders[name]().to(device).to(memory_format=fmt)
            opt = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9)
            xi = x.contiguous(memory_format=fmt)

            def step(model=model, opt=opt, xi=xi, amp=amp):
                with torch.autocast(device.type, dtype=dtype, enabled=amp):
                    loss = nn.functional.cross_entropy(model(xi), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            fns[('amp' if amp else 'fp32') + ('+cl' if cl else '')] = step
        t = {k: median(v) for k, v in interleaved_times(fns, device, args.repeats).items()}
        print(f"  {name:<10}" + '  '.join(f"{k} {v * 1000:7.0f} ({t['fp32'] / v:.2f}x)"
                                          for k, v in t.items()), flush=True)


def bench_pipeline(args):
    """Input pipeline, images/s per core, side by side in one process: the per-image
    path (JPEG decode + get_train_transforms(), float32 out) against the cached path
    (fast_data.CachedDataset: the fused warp from the memory-mapped cache, uint8 out),
    each fetching --images images per call and collating them as a DataLoader worker
    does, on one thread (torch and OpenCV), calls interleaved, best call kept. Prints
    their ratio (target >= 5x); then the batched device path (fast_data.augment_on_device)
    on --device, and normalize_on_device, which follows the cached path on the device."""
    import cv2
    import torch
    from torch.utils.data import default_collate
    from toolkit import data_cache
    from toolkit import fast_data
    from custom_dataloader import MiniPlacesLoader
    from make_demo_data import make_demo_dataset
    from student_code import get_train_transforms
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    device = torch.device(args.device)
    data = args.data or os.path.join(REPO, 'data', 'demo')
    if not os.path.isfile(os.path.join(data, 'train.txt')):
        make_demo_dataset(data)
    cache = data_cache.load_or_build_cache(data, 'train')
    supported, reason = fast_data.fused_path_supported(get_train_transforms())
    if not supported:
        print(f"get_train_transforms() has no fused path: {reason}")
        return None
    per_image = MiniPlacesLoader(data, 'train', get_train_transforms(), num_classes=None)
    cached = fast_data.CachedDataset(cache, get_train_transforms())
    n, total = args.images, len(cache)
    window = {'per-image': 0, 'cached': 0}

    def indices(path):                    # consecutive windows, wrapping around the split
        start = window[path]
        window[path] = (start + n) % total
        return [(start + k) % total for k in range(n)]

    fns = {'per-image': lambda: default_collate([per_image[i] for i in indices('per-image')]),
           'cached': lambda: default_collate(cached.__getitems__(indices('cached')))}
    print(f"pipeline benchmark: {data} train ({total} images), cache {cache.path}, "
          f"torch {torch.__version__}, OpenCV {cv2.__version__}, 1 thread, {n} images per "
          f"call, best of {args.repeats} interleaved calls")
    t = {k: min(v) for k, v in interleaved_times(fns, torch.device('cpu'), args.repeats).items()}
    rate = {k: n / sec for k, sec in t.items()}
    ratio = rate['cached'] / rate['per-image']
    print(f"  per-image path (decode + get_train_transforms, float32): "
          f"{rate['per-image']:8.0f} images/s per core")
    print(f"  cached path (memory-mapped cache, fused cv2 warp, uint8):  "
          f"{rate['cached']:8.0f} images/s per core")
    print(f"  ratio cached/per-image {ratio:.2f}x "
          f"(target >= 5x: {'PASS' if ratio >= 5 else 'FAIL'})")

    # the batched device path: the cache (its first images) on the device, whole batches
    batch = 256
    count = min(total, 8 * batch)
    images = torch.from_numpy(cache.images[:count].copy()).to(device)
    plan = cached.plan
    position = [0]

    def device_batch():
        idx = torch.arange(position[0], position[0] + batch, device=device) % count
        position[0] = (position[0] + batch) % count
        fast_data.augment_on_device(images.index_select(0, idx),
                                    fast_data.draw_params(plan, batch), plan)

    # a set smaller than a batch repeats its images, as device_batch() does
    uint8_batch = default_collate(cached.__getitems__([k % total for k in range(batch)]))
    uint8_batch = uint8_batch[0].to(device)
    mean, std = cached.normalization
    t = {k: min(v) for k, v in interleaved_times(
        {'device': device_batch,
         'normalize': lambda: fast_data.normalize_on_device(uint8_batch, mean, std)},
        device, args.repeats).items()}
    where = (torch.cuda.get_device_name(device) if device.type == 'cuda'
             else '1 thread; on a CPU the cached path above is used')
    print(f"  batched device path on {device} ({where}), batch {batch}: "
          f"{batch / t['device']:8.0f} images/s")
    print(f"    (parameters drawn on the CPU; warp, colour and normalization on {device})")
    print(f"  normalize_on_device on {device}, the uint8 paths' last step: "
          f"{batch / t['normalize']:8.0f} images/s")
    return ratio

