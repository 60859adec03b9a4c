"""Debugging and profiling of a training job (what SageMaker Debugger did): tensor collection, rules, the
system monitor and profiler capture, and the HTML report. Runs in the training images, on rank 0."""
