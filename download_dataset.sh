#!/bin/sh
# Download MiniPlaces into data/:  sh ./download_dataset.sh
#
#   data/data.tar.gz         the images, from Google Drive (needs gdown: pip install gdown)
#   data/images/ objects/    unpacked from data.tar.gz
#   data/train.txt val.txt   the image lists of github.com/CSAILVision/miniplaces
#
# Safe to run again: it skips what is already complete, and it ends by checking
# that every image listed in train.txt and val.txt exists. It stops at the first
# failure and says what to do. DATA_DIR=/some/folder puts the data elsewhere.
#
# A label file is kept only if every line reads "path label" and it has at least
# MIN_TRAIN_LINES (100000) or MIN_VAL_LINES (10000) of them; anything else (say, a
# rate-limit page served as train.txt) is deleted and downloaded again. The two
# variables exist for the tests, which serve lists of a few lines.
#
# No transfer can hang: one that cannot connect within CONNECT_TIMEOUT seconds (30), or
# that receives nothing for STALL_TIMEOUT seconds (60), is stopped, with a line saying
# so, at most about two minutes after it stalled (retries included). A slow transfer
# that still moves goes on however long it takes. Raise them on a very poor line,
# e.g. STALL_TIMEOUT=300 sh ./download_dataset.sh; the tests lower them to seconds
# and point LIST_URL at a local server.
set -eu

FILE_ID=16GYHdSWS3iMYwMPv5FpeDZN2rH7PR0F2
LIST_URL=${LIST_URL:-https://raw.githubusercontent.com/CSAILVision/miniplaces/master/data}
DATA_DIR=${DATA_DIR:-$(cd "$(dirname "$0")" && pwd)/data}
ARCHIVE=$DATA_DIR/data.tar.gz
MIN_TRAIN_LINES=${MIN_TRAIN_LINES:-100000}
MIN_VAL_LINES=${MIN_VAL_LINES:-10000}
CONNECT_TIMEOUT=${CONNECT_TIMEOUT:-30}
STALL_TIMEOUT=${STALL_TIMEOUT:-60}
# what every timeout message ends with
LIMITS="no connection within ${CONNECT_TIMEOUT} s or no data for ${STALL_TIMEOUT} s"
SLOW_LINE_HINT="on a slow line, allow longer stalls: STALL_TIMEOUT=300 sh ./download_dataset.sh"

fail() {
    echo "download_dataset.sh: $*" >&2
    exit 1
}

# fetch URL FILE: download with curl or wget into FILE.part, renamed once complete.
# curl: --speed-limit 1 --speed-time N stops a transfer that moved less than N bytes in
# N seconds, waiting for the first byte included; retries (a quick server error) start
# only within the first STALL_TIMEOUT seconds, so a stall is not waited out four times.
# wget: --read-timeout is the same stall limit; --tries=2 allows one retry.
fetch() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsSL --connect-timeout "$CONNECT_TIMEOUT" --speed-limit 1 \
            --speed-time "$STALL_TIMEOUT" --retry 3 --retry-max-time "$STALL_TIMEOUT" \
            -o "$2.part" "$1" || { rm -f "$2.part"; return 1; }
    elif command -v wget >/dev/null 2>&1; then
        wget -q --dns-timeout="$CONNECT_TIMEOUT" --connect-timeout="$CONNECT_TIMEOUT" \
            --read-timeout="$STALL_TIMEOUT" --tries=2 --waitretry=1 \
            -O "$2.part" "$1" || { rm -f "$2.part"; return 1; }
    else
        fail "neither curl nor wget found; install one (e.g. 'sudo apt install curl') and run again"
    fi
    mv "$2.part" "$2"
}

# part_bytes PREFIX: the bytes in the files whose names start with PREFIX
part_bytes() {
    bytes=0
    for part in "$1"*; do
        if [ -f "$part" ]; then
            bytes=$((bytes + $(wc -c < "$part")))
        fi
    done
    echo "$bytes"
}

# watched PREFIX COMMAND...: run a download that has no stall limit of its own (gdown,
# whose --timeout only recent versions have) and stop it once the files PREFIX* have not
# grown for STALL_TIMEOUT seconds (CONNECT_TIMEOUT more before the first byte arrives).
# Its exit status, or 124 when it was stopped.
watched() {
    prefix=$1
    shift
    "$@" &
    pid=$!
    # a background job ignores Ctrl-C: stop it with the script
    trap 'kill "$pid" 2>/dev/null; exit 130' INT TERM
    last=0 idle=0 limit=$((CONNECT_TIMEOUT + STALL_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        now=$(part_bytes "$prefix")
        if [ "$now" -ne "$last" ]; then
            last=$now idle=0 limit=$STALL_TIMEOUT
        else
            idle=$((idle + 1))
        fi
        if [ "$idle" -ge "$limit" ]; then
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            trap - INT TERM
            return 124
        fi
    done
    trap - INT TERM
    wait "$pid"
}

# list_problem FILE MIN: prints what is wrong with the label file FILE, nothing if it
# holds at least MIN lines and all of them (blank ones aside) read "path label"
list_problem() {
    bad=$(grep -c -v -E '^([^[:space:]]+[[:space:]]+[0-9]+)?[[:space:]]*$' "$1") || true
    good=$(grep -c -E '^[^[:space:]]+[[:space:]]+[0-9]+[[:space:]]*$' "$1") || true
    if [ "$bad" -gt 0 ]; then
        echo "$bad of its lines are not 'path label' (a web page instead of the list?)"
    elif [ "$good" -lt "$2" ]; then
        echo "it lists $good images, MiniPlaces has at least $2 (an incomplete download?)"
    fi
}

# get_list SPLIT MIN: SPLIT.txt in DATA_DIR, downloaded unless a good one is there
get_list() {
    list=$DATA_DIR/$1.txt
    if [ -s "$list" ]; then
        problem=$(list_problem "$list" "$2")
        if [ -z "$problem" ]; then
            echo "$1.txt: already there"
            return
        fi
        echo "$1.txt: $problem; deleted, downloading it again"
        rm -f "$list"
    fi
    echo "$1.txt: downloading from $LIST_URL"
    fetch "$LIST_URL/$1.txt" "$list" ||
        fail "could not download $LIST_URL/$1.txt (a network error, or $LIMITS); check the network connection and run again; $SLOW_LINE_HINT"
    problem=$(list_problem "$list" "$2")
    if [ -n "$problem" ]; then
        rm -f "$list"
        fail "the server sent a bad $1.txt: $problem; deleted it; if the network works, wait a few minutes (GitHub may be limiting downloads) and run again"
    fi
}

# count_split NAME: sets $total, $missing and $first_missing for the images of NAME.txt
count_split() {
    total=0 missing=0 first_missing=
    while read -r path label; do
        [ -n "$path" ] || continue
        total=$((total + 1))
        if [ ! -f "$DATA_DIR/images/$path" ]; then
            missing=$((missing + 1))
            [ -n "$first_missing" ] || first_missing=$path
        fi
    done < "$DATA_DIR/$1.txt"
}

# images_complete: prints the count per split; true when no listed image is missing
images_complete() {
    [ -d "$DATA_DIR/images" ] || return 1
    complete=0
    for split in train val; do
        count_split "$split"
        echo "$split: $((total - missing)) of $total images listed in $split.txt present"
        if [ "$missing" -gt 0 ]; then
            echo "  $missing missing, e.g. images/$first_missing"
            complete=1
        fi
    done
    return $complete
}

mkdir -p "$DATA_DIR" || fail "cannot create $DATA_DIR"
echo "MiniPlaces in $DATA_DIR"

get_list train "$MIN_TRAIN_LINES"
get_list val "$MIN_VAL_LINES"

if images_complete; then
    echo "images: complete, nothing to do"
    exit 0
fi

if [ -s "$ARCHIVE" ]; then
    echo "data.tar.gz: already downloaded"
else
    command -v gdown >/dev/null 2>&1 ||
        fail "gdown not found; install it with 'pip install gdown' in the Python environment of the course, then run again"
    echo "data.tar.gz: downloading from Google Drive with gdown"
    # into a .part file, so an interrupted download is never taken for a complete one
    # (gdown itself writes into a temporary data.tar.gz.part<random>.part beside it)
    status=0
    watched "$ARCHIVE.part" gdown "$FILE_ID" -O "$ARCHIVE.part" || status=$?
    if [ "$status" -ne 0 ]; then
        rm -f "$ARCHIVE.part"*
        [ "$status" -ne 124 ] ||
            fail "gdown stopped: the download of file id $FILE_ID stalled ($LIMITS); check the network connection and run again; $SLOW_LINE_HINT"
        fail "gdown could not download file id $FILE_ID; if Google Drive refuses (too many downloads), wait an hour and run again, or save https://drive.google.com/uc?id=$FILE_ID by hand as $ARCHIVE"
    fi
    mv "$ARCHIVE.part" "$ARCHIVE"
fi

echo "data.tar.gz: unpacking"
tar -xzf "$ARCHIVE" -C "$DATA_DIR" ||
    fail "cannot unpack $ARCHIVE (an incomplete or damaged download?); delete it and run again"
[ -d "$DATA_DIR/images" ] ||
    fail "$ARCHIVE holds no images/ folder; delete it and run again"

images_complete ||
    fail "images listed in train.txt/val.txt are missing after unpacking; delete $ARCHIVE (and $DATA_DIR/images) and run again"
echo "images: complete"
