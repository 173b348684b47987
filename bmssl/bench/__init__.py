"""Microbenchmarks of the bmssl ops (bench/bench_<op>.py runs them; so does `bmssl bench`)."""
