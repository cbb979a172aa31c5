#!/usr/bin/env bash
# Serve the frozen perceiver (OpenAI-compatible, served name "perceiver"); see _serve.sh for flags and environment.
exec "$(dirname "${BASH_SOURCE[0]}")/_serve.sh" perceiver "$@"
