"""The worker side: turns a SchedulerOutput into tensors, runs the model, samples."""
