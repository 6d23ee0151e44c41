#!/bin/bash
# the clean twin's rows beside compare.sh's: clean_*.json in this folder
set -euo pipefail
cd "$(dirname "$0")"
MODEL=planted-vit-clean bash ../ci/rows.sh clean --fix none
