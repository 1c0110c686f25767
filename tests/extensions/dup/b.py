from runex import register_kernel


def tidy(record):
    return record


register_kernel("unique_here", tidy)
register_kernel("clean", tidy)
