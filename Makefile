.PHONY: run test bench soak chaos compose-smoke compose-standins bare-machine-check

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

# Run the fault campaign under load and print one summary line; exits 1 when a target is missed.
chaos:
	@bash scripts/chaos.sh $(ARGS)

# Build the images, start the compose stack with the demo on loopback, send one notification on
# every channel, wait until each is delivered or sent, then tear it all down (Docker needed).
compose-smoke:
	@bash scripts/compose-smoke.sh

# Build local stand-ins for python:3.11-slim, postgres:15 and redis:7 from Debian packages (root).
compose-standins:
	@bash scripts/compose-standins.sh $(ARGS)

# Both commands on a fresh Debian root without Redis or PostgreSQL, sealed off from this machine's (root).
bare-machine-check:
	@bash scripts/bare-machine-check.sh $(ARGS)
