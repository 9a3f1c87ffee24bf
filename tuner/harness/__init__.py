"""What tuning, the benchmark and the tests share: inputs, the float32 reference, the correctness rule,
timing and the roofline floors."""
