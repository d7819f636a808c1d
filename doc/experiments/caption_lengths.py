#!/usr/bin/env python
"""How many Flickr8k captions a text `max_length` truncates (the text-length lever of doc/FLICKR8K_RECIPE.md).

Counts tokens as the text tower's tokenizer makes them (special tokens included, as `max_length`
counts them) over every caption of every split, and prints the share cut at each candidate length.
A length that truncates nothing cannot change what the model learns; a shorter one only saves time.

    python doc/experiments/caption_lengths.py --data ../shared/data/flickr8k
"""

import argparse



def main():
    import numpy as np

    from data_scripts import load_image_caption_dataset
    from dualencoder.processing import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/flickr8k", help="a Flickr8k directory")
    parser.add_argument("--text_model", default="offline:all-minilm-l6-v2", help="whose tokenizer counts the tokens")
    parser.add_argument("--lengths", default="16,20,24,32,40", help="candidate max_length values")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.text_model)
    splits = load_image_caption_dataset(args.data, view="pairs", verify_images=False)
    for split, pairs in splits.items():
        lengths = np.array([len(ids) for ids in tokenizer(list(pairs["caption"]))["input_ids"]])
        print(f"{split}: {len(lengths)} captions, tokens mean {lengths.mean():.1f}, median {np.median(lengths):.0f}, "
              f"99th percentile {np.percentile(lengths, 99):.0f}, max {lengths.max()}")
        for limit in (int(x) for x in args.lengths.split(",")):
            print(f"  max_length {limit}: {int((lengths > limit).sum())} truncated ({100 * (lengths > limit).mean():.2f}%)")


if __name__ == "__main__":
    main()
