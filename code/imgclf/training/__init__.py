"""The training image's code: the job entry point, its loop, checkpoints, data order, distributed training,
speed settings, the frozen-feature cache and evaluation. Runs in the train-cpu and train-gpu images."""
