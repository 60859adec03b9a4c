"""boto3 request builders shared by the scripts: every request is a plain dict a test can read."""
