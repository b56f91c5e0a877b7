#!/usr/bin/env bash
# Fixture: a 512-token tokenizer and a dataset from the first 4000 GCIDE entries.
source "$(dirname "$0")/common.sh"
mkdir -p "$CORPUS"
if [ ! -f "$CORPUS/gcide.idx" ]; then
  "$DATA" tokenizer --input gcide --max-documents 4000 --vocab-size 512 --output "$CORPUS/tok.model"
  "$DATA" tokenize --input gcide --max-documents 4000 --tokenizer "$CORPUS/tok.model" --output "$CORPUS/gcide"
fi
test -s "$CORPUS/gcide.bin" || fail "no dataset written"
