# `make test` is the one test command: it provisions PostgreSQL, then runs formatting, lints and
# the whole suite (unit, conformance on SQLite and PostgreSQL, end-to-end with fault injection).
# Before the suite it builds the upgrade fixture: a second meridian-agent binary that reports
# version 99.0.0-fixture (MERIDIAN_AGENT_VERSION, read with option_env! by the agent crate) into
# $(CARGO_TARGET_DIR)/upgrade-fixture, for the rollout tests that upgrade real agent processes.

export CARGO_TARGET_DIR ?= $(HOME)/.cache/meridian-target
export MERIDIAN_TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/postgres
# The pinned Schemathesis the API contract test (tests/api_contract.rs) runs, in its own venv.
export MERIDIAN_TEST_SCHEMATHESIS_VENV ?= $(HOME)/.cache/meridian-schemathesis
export MERIDIAN_TEST_SCHEMATHESIS ?= $(MERIDIAN_TEST_SCHEMATHESIS_VENV)/bin/schemathesis
# cargo-fuzz for `make fuzz`; its nightly flags on the stable toolchain with RUSTC_BOOTSTRAP=1.
CARGO_FUZZ_VERSION = 0.13.2
FUZZ_SECONDS ?= 120

.PHONY: test provision fmt-check clippy unit-and-e2e clean-test-databases run bench upgrade-fixture fuzz

test: provision fmt-check clippy clean-test-databases upgrade-fixture unit-and-e2e

provision:
	bash tests/provision-postgres.sh
	bash tests/provision-chromium.sh
	bash tests/provision-faketime.sh
	bash tests/provision-schemathesis.sh

fmt-check:
	cargo fmt --all -- --check

clippy:
	cargo clippy --workspace --all-targets -- -D warnings

# Test databases are named meridian_t_*; drop the ones earlier runs left behind.
clean-test-databases:
	@if command -v psql >/dev/null 2>&1; then \
	  psql "$(MERIDIAN_TEST_DATABASE_URL)" -Atqc "SELECT datname FROM pg_database WHERE datname LIKE 'meridian\_t\_%'" \
	  | while read -r db; do psql "$(MERIDIAN_TEST_DATABASE_URL)" -qc "DROP DATABASE IF EXISTS $$db" >/dev/null; done; \
	fi

# Without debug info and stripped (about 27 MB instead of 260): the rollout tests upload it.
upgrade-fixture:
	MERIDIAN_AGENT_VERSION=99.0.0-fixture CARGO_PROFILE_DEV_DEBUG=0 CARGO_PROFILE_DEV_STRIP=true \
	  cargo build -p meridian-agent --bin meridian-agent --target-dir $(CARGO_TARGET_DIR)/upgrade-fixture

unit-and-e2e:
	cargo test --workspace --lib --bins --tests

run:
	cargo run --release -- dev

bench:
	cargo bench --bench ingest
	cargo bench --bench agent_tickets
	cargo bench --bench stats_query
	cargo bench --bench appointment_sync
	cargo bench --bench request_transfers

# Fuzzes the gateway's decoding of agent frames (fuzz/, not a workspace member) for
# FUZZ_SECONDS; not part of `make test`. Crashes land in fuzz/artifacts/gateway_frames/.
fuzz:
	@command -v cargo-fuzz >/dev/null 2>&1 && cargo fuzz --version | grep -q " $(CARGO_FUZZ_VERSION)$$" \
	  || cargo install --locked cargo-fuzz@$(CARGO_FUZZ_VERSION)
	cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run gateway_frames --sanitizer none --debug-assertions \
	  --target-dir $(CARGO_TARGET_DIR)/fuzz -- -max_total_time=$(FUZZ_SECONDS)
