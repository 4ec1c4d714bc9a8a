# keyctl's own argument checks of pkey_* and dh_compute_kdf*, which come
# before the kernel (or keyfence) is asked.
t() {
    out=$(keyctl "$@" 2>&1)
    rc=$?
    printf '%s: %s rc=%s\n' "$(printf '%s' "$*" | sed 's/o=0000*/o=0.../')" "${out%%
*}" $rc
}
k=$(keyctl add user k v @s)
echo data >data
long=o=$(printf '%04100d' 0)
t pkey_query $k 0 badparam
t pkey_query $k 0 a=b nokv
t pkey_query $k 0 "$long"
t pkey_query $k 0 a=b "$long"
t pkey_query $k 1
t pkey_query $k ''
t pkey_query 12x 1 nokv
t pkey_query 12x 1
t pkey_query $k 0
t pkey_sign $k 0 data nokv
t pkey_sign $k 1 /nonexistent
t pkey_encrypt $k 0 /nonexistent
t pkey_decrypt $k 0 /nonexistent enc=pkcs1
t pkey_sign $k 0 /nonexistent
t pkey_encrypt $k 0 /tmp
t pkey_encrypt $k 0 data
t pkey_verify $k 0 data /nonexistent
t pkey_verify $k 0 /nonexistent data
t dh_compute_kdf $k $k $k -1 sha256
t dh_compute_kdf $k $k $k 99999999999999999999999 sha256
t dh_compute_kdf $k $k $k 99999999999999 sha256
t dh_compute_kdf 12x $k $k -1 sha256
t dh_compute_kdf_oi $k $k $k -1 sha256
echo zz | t dh_compute_kdf_oi -x $k $k $k 99999999999999 sha256
