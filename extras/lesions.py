"""HAM10000's split by lesion: data.find_pairs brings this module in when a data folder holds
HAM10000_metadata.csv (data.LESION_METADATA). One lesion is often photographed several times, so
the split hashes the lesion_id, not the image id, and no lesion lands in two splits.
docs/data.md#ham10000-and-splitting-by-lesion.
"""
import csv

import common


def lesion_groups(path):
    """{image_id: lesion_id} from the metadata file at path. An image it does not list keeps its
    own id as its group (find_pairs); a file without the two columns is one Error."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not {"lesion_id", "image_id"} <= set(reader.fieldnames or ()):
                raise common.Error(path, "needs lesion_id and image_id columns "
                                   f"(has {', '.join(reader.fieldnames or []) or 'none'})")
            return {row["image_id"].strip(): row["lesion_id"].strip() for row in reader
                    if row["image_id"] and row["lesion_id"] and row["lesion_id"].strip()}
    except (UnicodeDecodeError, csv.Error) as e:
        raise common.Error(path, f"unreadable metadata ({common.one_line(e)})") from None
