//! `shardstore`: the server (`serve`) and its admin CLI.

mod admin;
mod conn;
mod handler;
mod serve;
mod stats;

use clap::{Args, Parser, Subcommand};
use shardstore_proto::{limits, ChunkId};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "shardstore",
    version,
    about = "Thread-per-core sharded chunk storage server"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the server.
    Serve(ServeArgs),
    /// Write a chunk (or part of one) from a file or standard input.
    Put {
        #[command(flatten)]
        conn: ConnArgs,
        /// Chunk id, up to 32 hex digits.
        chunk: ChunkId,
        /// File to read; `-` or nothing for standard input.
        file: Option<PathBuf>,
        /// Byte offset within the chunk.
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
    /// Read a chunk (or part of one) to standard output or a file.
    Get {
        #[command(flatten)]
        conn: ConnArgs,
        chunk: ChunkId,
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Bytes to read; default: to the end of the chunk.
        #[arg(long)]
        len: Option<u64>,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Show a chunk's length, version and times.
    Stat {
        #[command(flatten)]
        conn: ConnArgs,
        chunk: ChunkId,
    },
    /// Delete a chunk.
    Rm {
        #[command(flatten)]
        conn: ConnArgs,
        chunk: ChunkId,
    },
    /// List chunks, shard by shard.
    Ls {
        #[command(flatten)]
        conn: ConnArgs,
        /// Only this shard.
        #[arg(long)]
        shard: Option<u32>,
        /// Stop after this many chunks.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Round-trip a PING to the node and to every shard.
    Ping {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Show the node's topology.
    Topology {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Show every shard's counters.
    Stats {
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// Server front address.
    #[arg(long, env = "SHARDSTORE_ADDR", default_value = "127.0.0.1:7700")]
    pub addr: String,
    /// Per-request timeout in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Front address; shard i also listens on port+1+i (ephemeral ports when 0).
    #[arg(long, env = "SHARDSTORE_LISTEN", default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Data folder, created if missing. O_DIRECT needs a real filesystem (not tmpfs).
    #[arg(long, env = "SHARDSTORE_DATA_DIR", default_value = "./shardstore-data")]
    data_dir: PathBuf,
    /// Number of shards; default: the data folder's, or one per allowed CPU.
    #[arg(long, env = "SHARDSTORE_SHARDS")]
    shards: Option<u32>,
    /// Data area per shard, MiB (preallocated on creation).
    #[arg(long, env = "SHARDSTORE_CAPACITY_MIB", default_value_t = 1024)]
    capacity_mib: u64,
    /// glommio registered I/O memory per shard, KiB (must fit RLIMIT_MEMLOCK across shards).
    #[arg(long, env = "SHARDSTORE_IO_MEMORY_KIB", default_value_t = 1024)]
    io_memory_kib: usize,
    /// Largest payload of one request, bytes.
    #[arg(long, env = "SHARDSTORE_MAX_PAYLOAD", default_value_t = limits::MAX_PAYLOAD)]
    max_payload: u32,
    /// Largest chunk, bytes.
    #[arg(long, env = "SHARDSTORE_MAX_CHUNK_SIZE", default_value_t = limits::MAX_CHUNK_SIZE)]
    max_chunk_size: u64,
    /// sled index cache per shard, MiB.
    #[arg(long, env = "SHARDSTORE_INDEX_CACHE_MIB", default_value_t = 16)]
    index_cache_mib: u64,
    /// Once every shard is ready, write the front address to this file
    /// (for scripts and tests that listen on port 0).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Bound of each shard's queue of requests forwarded by other shards.
    #[arg(long, env = "SHARDSTORE_FORWARD_QUEUE", default_value_t = 1024)]
    forward_queue: usize,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.cmd {
        Cmd::Serve(a) => serve_cmd(a),
        other => admin::run(other),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shardstore: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve_cmd(a: ServeArgs) -> anyhow::Result<ExitCode> {
    if a.max_payload == 0
        || a.max_payload > limits::MAX_PAYLOAD
        || a.max_payload % limits::SECTOR_SIZE != 0
    {
        anyhow::bail!(
            "--max-payload must be a multiple of {} between {} and {}",
            limits::SECTOR_SIZE,
            limits::SECTOR_SIZE,
            limits::MAX_PAYLOAD
        );
    }
    if a.max_chunk_size == 0 || a.max_chunk_size > limits::MAX_CHUNK_SIZE {
        anyhow::bail!(
            "--max-chunk-size must be between 1 and {}",
            limits::MAX_CHUNK_SIZE
        );
    }
    if a.capacity_mib < 1 {
        anyhow::bail!("--capacity-mib must be at least 1");
    }
    serve::serve(serve::ServeOptions {
        listen: a.listen,
        data_dir: a.data_dir,
        shards: a.shards,
        capacity_bytes: a.capacity_mib << 20,
        io_memory_bytes: a.io_memory_kib << 10,
        max_payload: a.max_payload,
        max_chunk_size: a.max_chunk_size,
        index_cache_bytes: a.index_cache_mib << 20,
        forward_queue: a.forward_queue.max(1),
        ready_file: a.ready_file,
    })?;
    Ok(ExitCode::SUCCESS)
}
