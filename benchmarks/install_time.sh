#!/usr/bin/env bash
# Fresh-venv install times, locked and unlocked, and the README's tiny first run.
#   bash benchmarks/install_time.sh        # prints a table, writes benchmarks/results/install_time.json
# Run it twice for warm-cache numbers (the first run also downloads); RESULTS.md says which it quotes.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
now() { date +%s.%N; }
secs() { python3 -c "print(round($2 - $1, 1))"; }

python3 -m venv "$work/locked"
t0=$(now); "$work/locked/bin/pip" install -q torch==2.13.0; t1=$(now)
"$work/locked/bin/pip" install -q -c requirements/lock.txt -e ".[test]"; t2=$(now)
python3 -m venv "$work/newest"
"$work/newest/bin/pip" install -q torch==2.13.0; t3=$(now)
"$work/newest/bin/pip" install -q -e ".[test]"; t4=$(now)

"$work/locked/bin/python" -c "
import sys; sys.path.insert(0, 'tests')
from conftest import write_photos; from pathlib import Path
write_photos(Path('$work/my_dog_photos'), n=5, size=(256, 256))"
t5=$(now)
(cd "$work" && PERSONALIZE_CACHE="$work/cache" "$work/locked/bin/personalize" lora --subject my_dog_photos \
  --class-noun dog --base tiny --steps 50 --class-images 20 > /dev/null)
t6=$(now)

torch_s=$(secs "$t0" "$t1"); locked_s=$(secs "$t1" "$t2"); unlocked_s=$(secs "$t3" "$t4"); tiny_s=$(secs "$t5" "$t6")
printf '%-28s %8s\n' step seconds
printf '%-28s %8s\n' "torch==2.13.0" "$torch_s" "project [test], locked" "$locked_s" \
  "project [test], unlocked" "$unlocked_s" "README tiny line" "$tiny_s"
mkdir -p benchmarks/results
printf '{"torch_s": %s, "locked_s": %s, "unlocked_s": %s, "tiny_line_s": %s, "cpus": %s}\n' \
  "$torch_s" "$locked_s" "$unlocked_s" "$tiny_s" "$(nproc)" > benchmarks/results/install_time.json
