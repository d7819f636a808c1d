#!/usr/bin/env bash
# Copy Flickr8k's 1,000 test images, their 5,000 captions and the split lists into
# benchmarks/data/flickr8k_test/ in the official layout (about 27 MB), for the device machine,
# which gets the working tree but not ../shared: name "benchmarks/data" in the run call's carry.
#
#   bash benchmarks/make_flickr_subset.sh [SOURCE_DIR] [TARGET_DIR]
#
# The loader wants all three split lists beside the token file, so the train and dev lists are
# written empty: the copy loads as a DatasetDict whose only non-empty split is `test`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="${1:-$here/../../shared/data/flickr8k}"
dst="${2:-$here/data/flickr8k_test}"
text="$src/Flickr8k_text"
images="$src/Flicker8k_Dataset"

mkdir -p "$dst/Flicker8k_Dataset" "$dst/Flickr8k_text"
tr -d '\r' < "$text/Flickr_8k.testImages.txt" | sed '/^$/d' > "$dst/Flickr8k_text/Flickr_8k.testImages.txt"
: > "$dst/Flickr8k_text/Flickr_8k.trainImages.txt"
: > "$dst/Flickr8k_text/Flickr_8k.devImages.txt"
# The captions of the test images only (token lines are "<image>.jpg#<n><TAB><caption>").
awk -F'#' 'NR == FNR { keep[$0]; next } ($1 in keep)' \
    "$dst/Flickr8k_text/Flickr_8k.testImages.txt" "$text/Flickr8k.token.txt" > "$dst/Flickr8k_text/Flickr8k.token.txt"
sed "s|^|$images/|" "$dst/Flickr8k_text/Flickr_8k.testImages.txt" | xargs cp -t "$dst/Flicker8k_Dataset/"

echo "$dst: $(ls "$dst/Flicker8k_Dataset" | wc -l) images, $(wc -l < "$dst/Flickr8k_text/Flickr8k.token.txt") captions, $(du -sh "$dst" | cut -f1)"
