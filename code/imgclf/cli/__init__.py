"""The command-line programs, installed as console scripts (pyproject.toml [project.scripts]): imgclf-train,
imgclf-tune, imgclf-deploy, imgclf-predict, imgclf-batch-predict, imgclf-upload-data, imgclf-push-images and
imgclf-demo. From a checkout, `python scripts/<name>.py` runs the same program."""
