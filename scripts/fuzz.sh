#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS_PER_TARGET seconds each, one after the
# other, and prints one summary line per target and a total. Stops at the first crash (a
# panic, a sanitizer report, an input over -timeout or -rss_limit_mb) with the path of the
# input that caused it, and exits non-zero.
#
#   scripts/fuzz.sh SECONDS_PER_TARGET [TARGET...]     (default: every target)
#
# The committed seed corpus (fuzz/corpus/<target>) is only read: libFuzzer writes new inputs
# into the first corpus directory it is given, here fuzz/target/corpus/<target>, which is
# ignored by git and kept between runs, so `make test` never changes the tree and long runs
# build on what earlier runs found. Full libFuzzer logs: fuzz/target/logs/<target>.log; a
# crash input lands in fuzz/artifacts/<target>/ (ignored by git); replay it with
# `cargo +$MOAT_NIGHTLY fuzz run <target> fuzz/artifacts/<target>/<file>` (toolchain.env).
#
# FUZZ_SANITIZER (default: address) is passed to `cargo fuzz build -s`: `make test`'s short
# run uses `none`, which builds in a fraction of the time (moatd's dependency tree under ASan
# dominates the build) and still finds panics, loops and budget breaches; the long run keeps
# AddressSanitizer for the unsafe code in dependencies. FUZZ_PROFILE (default: release) is
# `dev` for the short run as well.
set -euo pipefail
cd "$(dirname "$0")/.."
# The pinned nightly (toolchain.env is the one place that names it).
# shellcheck source=SCRIPTDIR/../toolchain.env
. ./toolchain.env
sanitizer=${FUZZ_SANITIZER:-address}

secs=${1:?usage: scripts/fuzz.sh SECONDS_PER_TARGET [TARGET...]}
shift
if ! [[ $secs =~ ^[1-9][0-9]*$ ]]; then
  echo "fuzz.sh: SECONDS_PER_TARGET must be a positive integer, not '$secs'" >&2
  exit 2
fi

cd fuzz
if (($# > 0)); then
  targets=("$@")
else
  mapfile -t targets < <(cargo +"$MOAT_NIGHTLY" fuzz list)
fi

# One build for all targets up front, then the built binaries are run directly: `cargo fuzz
# run` would rebuild first, and in a tree that is being edited that is a relink of every
# target between runs. The flags are those `cargo fuzz run` passes (artefacts in
# fuzz/artifacts/<target>/).
# FUZZ_PROFILE=dev (make test's smoke run) builds without optimisation: a fraction of the
# build time, fewer executions per second, the same checks.
if [[ ${FUZZ_PROFILE:-release} == dev ]]; then
  cargo +"$MOAT_NIGHTLY" fuzz build --dev -s "$sanitizer" >&2
  profile_dir=debug
else
  cargo +"$MOAT_NIGHTLY" fuzz build -s "$sanitizer" >&2
  profile_dir=release
fi
bin=target/$(rustc +"$MOAT_NIGHTLY" -vV | sed -n 's/^host: //p')/$profile_dir

mkdir -p target/logs
total_runs=0 total_new=0 total_secs=0
for t in "${targets[@]}"; do
  scratch=target/corpus/$t
  log=target/logs/$t.log
  mkdir -p "$scratch" "corpus/$t" "artifacts/$t"
  start=$(date +%s)
  if ! "$bin/$t" -artifact_prefix="artifacts/$t/" \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    "$scratch" "corpus/$t" >"$log" 2>&1; then
    echo "fuzz.sh: $t FAILED after $(($(date +%s) - start)) s; last lines of $log:" >&2
    tail -n 40 "$log" >&2
    artefact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
    echo "fuzz.sh: $t: crash input: ${artefact:-none written (see $log)}" >&2
    exit 1
  fi
  elapsed=$(($(date +%s) - start))
  # libFuzzer's last words: "Done N runs in S second(s)" and the final stat:: lines.
  runs=$(sed -n 's/^Done \([0-9]*\) runs in.*/\1/p' "$log" | tail -n 1)
  new=$(sed -n 's/^stat::new_units_added: *\([0-9]*\)/\1/p' "$log" | tail -n 1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2)
  corpus=$(find "$scratch" -type f | wc -l)
  printf '%-12s %6d s  %10d execs  %5d new units  cov %6s  scratch corpus %5d  seeds %3d\n' \
    "$t" "$elapsed" "${runs:-0}" "${new:-0}" "${cov:-?}" "$corpus" \
    "$(find "corpus/$t" -type f | wc -l)"
  total_runs=$((total_runs + ${runs:-0}))
  total_new=$((total_new + ${new:-0}))
  total_secs=$((total_secs + elapsed))
done
printf '%-12s %6d s  %10d execs  %5d new units  %d targets, no crashes\n' \
  total "$total_secs" "$total_runs" "$total_new" "${#targets[@]}"
