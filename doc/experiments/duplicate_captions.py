#!/usr/bin/env python
"""How often two training images share a caption (the "What limits it" section of doc/FLICKR8K_RECIPE.md).

In-batch losses treat the captions of every other image in the batch as negatives. A caption that
another image also has (after lower-casing and dropping punctuation) is a false negative whenever
both images share a batch. This counts such captions in the training split, and the expected number
of images per batch of `--batch_size` random images that have one with another image of the batch.

    python doc/experiments/duplicate_captions.py --data ../shared/data/flickr8k
"""

import argparse
import re
from collections import defaultdict



def main():
    from data_scripts import load_image_caption_dataset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/flickr8k", help="a Flickr8k directory")
    parser.add_argument("--batch_size", type=int, default=128, help="images per batch (the shipped config's)")
    args = parser.parse_args()
    train = load_image_caption_dataset(args.data, view="pairs", verify_images=False)["train"]
    train = train.select_columns(["image_id", "caption"]).to_dict()
    images_of = defaultdict(set)
    for image_id, caption in zip(train["image_id"], train["caption"]):
        images_of[" ".join(re.sub(r"[^a-z ]", " ", caption.lower()).split())].add(image_id)
    shared = {caption: images for caption, images in images_of.items() if len(images) > 1}
    partners = defaultdict(set)  # image -> the other images it shares a caption with
    for images in shared.values():
        for image in images:
            partners[image] |= images - {image}
    n_images = len(set(train["image_id"]))
    # chance that at least one of an image's partners is among the batch's other (batch_size - 1) random images
    share = (args.batch_size - 1) / (n_images - 1)
    expected = sum(1 - (1 - share) ** len(others) for others in partners.values()) * args.batch_size / n_images
    print(f"{len(images_of):,} distinct captions over {n_images:,} training images; {len(shared):,} of them belong "
          f"to more than one image ({len(partners):,} images have such a caption)")
    print("most shared: " + "; ".join(f"{caption!r} x{len(images)}" for caption, images in
                                      sorted(shared.items(), key=lambda item: -len(item[1]))[:5]))
    print(f"expected images per random batch of {args.batch_size} that share a caption with another image of the "
          f"batch: {expected:.2f}")


if __name__ == "__main__":
    main()
