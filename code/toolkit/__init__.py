"""The driver's machinery: the modules main.py imports, one concept each. Imported as
`from toolkit import x` with code/ on sys.path (main.py puts it there); never put
this folder itself on sys.path, or a module would load twice.

attack_eval.py  Part III in the driver: attack evaluation, its meters, saliency
checkpoint.py   the checkpoint files: their entries, one writer, one reader, fingerprints
data_cache.py   the decoded-image cache: every image decoded once, shared by the workers
data_order.py   the training order and each image's augmentation seed, from (seed, epoch)
distributed.py  torchrun and DistributedDataParallel: processes, their share, their batches
fast_data.py    the fused augmentation that reads the cache: the fast input pipeline
loaders.py      the data loaders, per-image and cached; the uint8 hand-over; the class count
networks.py     building models and optimizers: the --arch names, the convolution swap
run_folder.py   the run folder: its lock, summary.json, the commit of an epoch, dead runs
run_guard.py    how a run ends: signals, exit codes, one-line errors, the ending status
run_plan.py     resolve: the flags, checkpoint, data and device into the frozen plan
run_record.py   the summary.json schema and the TensorBoard tags, defined once
resume.py       resuming a run: the training state to go on from, in one step
safe_files.py   the one lock and the one atomic write (run folder, data cache, submission zip)
settings.py     every setting, one row each: the parser, the checks and the plan's fields
speed.py        --amp, --channels-last, --compile, --data-cache: the speed settings
"""
