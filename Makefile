# AeroKV: every target sets up what it needs first (`make setup` is idempotent and fast when done).
SHELL := /bin/bash
.DEFAULT_GOAL := help
ENV := source scripts/env.sh &&

.PHONY: help setup build test demo demo-radio bench-engine bench-planner bench-swarm bench-recovery bench-radio clean

help:
	@echo "make demo           set up, build, run a 4-drone swarm on this machine"
	@echo "make demo-radio     the same over an emulated 802.11 radio: a drone flies out of range mid-answer"
	@echo "make test           set up, build, run every test"
	@echo "make setup          install Debian packages, the ROS 2 + ONNX Runtime venv, interfaces, model parts"
	@echo "make build          release binaries (target/release/aerokv and the four nodes)"
	@echo "make bench-engine | bench-planner | bench-swarm | bench-recovery | bench-radio [BENCH_ARGS=--quick]"

setup:
	@scripts/setup.sh

build: setup
	@$(ENV) cargo build --release --workspace --bins

test: build
	@scripts/test.sh

demo: build
	@scripts/demo.sh

demo-radio: build
	@scripts/demo-radio.sh

bench-engine: build
	@$(ENV) cargo build --release -q -p aerokv-engine --example decode_context
	@$(ENV) scripts/bench-engine.sh

# Benchmarks that start DDS processes run inside `unshare -n` on a ROS domain of their own.
BENCH_NET := unshare -n -- bash -c 'ip link set lo up; export ROS_DOMAIN_ID=$$((150 + $$$$ % 50)); exec "$$@"' bench

bench-swarm: build
	@$(ENV) cargo build --release -q -p aerokv-engine --example pipeline_rhythm
	@$(ENV) $(BENCH_NET) python3 scripts/bench_swarm.py swarm

bench-recovery: build
	@$(ENV) $(BENCH_NET) python3 scripts/bench_swarm.py recovery

# The swarm over the emulated radio, per scenario and codec (17 runs, ~4 min here; BENCH_ARGS=--quick: 7 runs, ~1.5 min).
bench-radio: build
	@$(ENV) $(BENCH_NET) python3 scripts/bench_radio.py $(BENCH_ARGS)

bench-planner: setup
	@$(ENV) cargo run --release -q -p aerokv-sim --bin bench-planner

clean:
	rm -rf target build install log
