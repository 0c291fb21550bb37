"""The benchmarks of tools/benchmark.py, one module per family (docs/benchmarks.md).
Imported as `from benchmarks import x` with tools/ on sys.path.

bench_accuracy_time.py  accuracy-time: the time to a validation top-1
bench_parts.py          conv, attention, attack: our code against a reference in one process
bench_recipe.py         recipe: the handout's training recipe on real and demo images, via main.py
bench_runs.py           models, train, ddp: the benchmarks that train with main.py
bench_scale.py          scale: the input pipeline at MiniPlaces' size, and a full run projected
bench_scale_tables.py   the scale benchmark's tables and the GPU figures they rest on
bench_shared.py         shared: one training process alone, then two on the same cores
bench_speed.py          step and pipeline: a training step per speed setting, input images/s
bench_timing.py         timers, saved bytes and the machine, shared by the benchmarks
"""
