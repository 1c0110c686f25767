from runex import register_kernel


@register_kernel("double")
def double(record, field="n"):
    return {**record, field: record[field] * 2}
