#!/usr/bin/env bash
# Mutation testing of the diagnosis core with mutmut (documented in DEVELOPERS.md; not part of CI).
#
#   bash scripts/mutation.sh                      every module of [tool.mutmut] only_mutate, from scratch
#   bash scripts/mutation.sh sinkless.scan.report one module (or a package: sinkless.registers)
#   bash scripts/mutation.sh table [-v]           the per-module score table of the last run (-v: survivors)
#   bash scripts/mutation.sh rerun                re-check the last run's survivors and untested mutants (after adding tests)
#   bash scripts/mutation.sh named                the one-line bugs of issue 15, one at a time
#
# Needs `pip install -e .[mutation]`. Each module's mutants run only the tests mirroring it (MUTATION_TESTS
# in tests/conftest.py), fast ones only (`-m "not slow"`). MUTATION_CHILDREN (default 1) sets the parallel
# test processes; MUTATION_RESUME=1 keeps earlier results in mutants/ (only unchecked mutants run).
# Survivors judged equivalent are listed, with reasons, in scripts/mutation_equivalent.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import mutmut" 2>/dev/null || { echo "mutmut is missing: pip install -e '.[mutation]'" >&2; exit 2; }
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
case "${1:-}" in
  named) exec python scripts/named_mutants.py ;;
  table) exec python scripts/mutation_table.py "${@:2}" ;;
  rerun)  # re-check the survivors of the last run (after adding tests)
    mapfile -t survivors < <(python scripts/mutation_table.py -v | sed -n 's/^  \(sinkless\.[^ ]*\)$/\1/p')
    [ ${#survivors[@]} -eq 0 ] || mutmut run --max-children "${MUTATION_CHILDREN:-1}" "${survivors[@]}" > mutants/run-rerun.log 2>&1
    # mutants no test reached when they ran: tests added since may reach them
    mapfile -t untested < <(python scripts/mutation_table.py -n)
    [ ${#untested[@]} -eq 0 ] || mutmut run --max-children "${MUTATION_CHILDREN:-1}" "${untested[@]}" > mutants/run-rerun-untested.log 2>&1
    # functions changed since their run got new, unchecked mutants: check those too
    mapfile -t fresh < <(python scripts/mutation_table.py -u)
    [ ${#fresh[@]} -eq 0 ] || mutmut run --max-children "${MUTATION_CHILDREN:-1}" "${fresh[@]}" > mutants/run-rerun-fresh.log 2>&1
    exec python scripts/mutation_table.py ;;
esac
if [ $# -eq 0 ]; then
  set -- sinkless.scan.norms sinkless.scan.report sinkless.scan.measure sinkless.tasks.lost sinkless.hooks \
    sinkless.registers.discovery sinkless.registers.ttr sinkless.registers.inputs sinkless.streaming.cache \
    sinkless.scan.inputs sinkless.scan.x_
fi  # the figure and HTML rendering (sinkless.scan.plots, sinkless.scan.html) only when named
[ "${MUTATION_RESUME:-0}" = 1 ] || rm -rf mutants
mkdir -p mutants
for module in "$@"; do
  echo "== mutmut: $module"
  case "$module" in *.x_) pattern="$module*" ;; *) pattern="$module.*" ;; esac  # sinkless.scan.x_: the package's own functions
  mutmut run --max-children "${MUTATION_CHILDREN:-1}" "$pattern" > "mutants/run-$module.log" 2>&1 || { tail -20 "mutants/run-$module.log"; exit 1; }
  tail -c 2000 "mutants/run-$module.log" | tr '\r' '\n' | grep -E "mutations/second" || true
done
python scripts/mutation_table.py
