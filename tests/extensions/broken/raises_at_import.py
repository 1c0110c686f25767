from runex import register_kernel

SETTINGS = {"rate": 1}
register_kernel("rated", lambda record: record)
RATE = SETTINGS["ratee"]
