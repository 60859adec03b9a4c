"""The per-class results of a job (imgclf.debugging.classes): worst classes, most-confused pairs with example
files, and a heatmap that labels every one of 133 classes."""

from __future__ import annotations

import io

from imgclf.debugging import classes
from PIL import Image


def test_worst_classes_and_most_confused_pairs_with_examples():
    names = ["001.Affenpinscher", "002.Afghan_hound", "003.Airedale_terrier"]
    confusion = [[3, 1, 0],   # 4 images, 1 taken for an Afghan hound
                 [2, 2, 0],   # 4 images, 2 taken for Affenpinschers
                 [0, 0, 2]]
    samples = [(f"/data/test/{names[label]}/{label}_{i}.jpg", label) for label, n in ((0, 4), (1, 4), (2, 2))
               for i in range(n)]
    predictions = [0, 0, 1, 0, 0, 1, 0, 1, 2, 2]
    result = classes.analyse("test", names, confusion, samples, predictions)
    assert result.worst == [{"class": "002.Afghan_hound", "accuracy": 0.5, "images": 4},
                            {"class": "001.Affenpinscher", "accuracy": 0.75, "images": 4},
                            {"class": "003.Airedale_terrier", "accuracy": 1.0, "images": 2}]
    assert result.most_confused == [
        {"true": "002.Afghan_hound", "predicted": "001.Affenpinscher", "count": 2, "share": 0.5,
         "examples": ["002.Afghan_hound/1_0.jpg", "002.Afghan_hound/1_2.jpg"]},
        {"true": "001.Affenpinscher", "predicted": "002.Afghan_hound", "count": 1, "share": 0.25,
         "examples": ["001.Affenpinscher/0_2.jpg"]}]
    assert result.to_json() == {"split": "test", "worst": result.worst, "most_confused": result.most_confused}
    # several processes (no predictions): the pairs without examples
    assert [p["examples"] for p in classes.analyse("test", names, confusion).most_confused] == [[], []]


def test_the_heatmap_labels_all_133_classes_in_name_order(tmp_path):
    names = [f"{i:03d}.Breed_{i}" for i in range(133, 0, -1)]  # given in reverse: the axes sort them
    confusion = [[5 if t == p else (1 if p == (t + 1) % 133 else 0) for p in range(133)] for t in range(133)]
    result = classes.analyse("valid", names, confusion)
    figure = classes.heatmap(result)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == sorted(names)
    assert [t.get_text() for t in ax.get_yticklabels()] == sorted(names)
    assert figure.get_size_inches()[1] > 15  # grows with the classes: 133 labels stay apart
    assert len(result.worst) == classes.WORST and len(result.most_confused) == classes.PAIRS
    written = classes.write_pngs(tmp_path, result)
    assert [p.name for p in written] == ["confusion_matrix_valid.png", "worst_classes_valid.png"]
    with Image.open(io.BytesIO(written[0].read_bytes())) as image:
        assert image.format == "PNG" and image.size[0] > 1200
