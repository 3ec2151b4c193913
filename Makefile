.PHONY: run test bench soak

# Set up everything and run the service with its demo.
run:
	@bash scripts/run.sh

# Set up everything and run the whole test suite (PostgreSQL + Redis).
test:
	@bash scripts/test.sh $(ARGS)

# Push notifications through the whole pipeline and print throughput and latency.
bench:
	@bash scripts/bench.sh $(ARGS)

# A steady mixed load for an hour; fails if any process's memory, files or connections keep growing.
soak:
	@bash scripts/soak.sh $(ARGS)
