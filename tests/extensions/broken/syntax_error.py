from runex import register_kernel


def broken(record)
    return record
