from runex import register_kernel


@register_kernel("clean")
def clean(record):
    return record
