// atlaspatch-stream over N shards with Nextflow: one task per shard, all writing to one shared output folder.
// Each task claims a slide before opening it (a lock file on the output), so shards, retried tasks and thieves
// (--steal) never process a slide twice; a rerun (-resume or not) skips finished slides.
//
//   nextflow run examples/slurm/main.nf -c examples/slurm/nextflow.config -profile slurm \
//       --input /data/slides --output /data/atlaspatch-out --shards 16
//
// One task should take many slides: every task loads the models once (tens of seconds for large encoders).

nextflow.enable.dsl = 2

params.input = null
params.output = null
params.shards = 16
params.patch_size = 256
params.target_mag = 20
params.encoders = 'uni_v1'
params.device = 'cuda'
params.extra = ''          // more `atlaspatch process` flags, e.g. '--feature-precision float32'

process ATLASPATCH_SHARD {
    tag "shard ${shard}/${params.shards}"
    label 'atlaspatch'
    // Exit 1 means some slide failed (listed in the run report); one retry picks up slides a killed task left.
    errorStrategy { task.attempt <= 2 ? 'retry' : 'ignore' }
    maxRetries 2

    input:
    val shard

    output:
    val shard

    script:
    """
    export HDF5_USE_FILE_LOCKING=FALSE
    atlaspatch process ${params.input} -o ${params.output} \\
        --shard ${shard}/${params.shards} --steal --stage-dir "\${TMPDIR:-/tmp}" \\
        --patch-size ${params.patch_size} --target-mag ${params.target_mag} \\
        --feature-extractors ${params.encoders} --device ${params.device} ${params.extra}
    """
}

workflow {
    if (!params.input || !params.output) {
        error "pass --input SLIDE_FOLDER and --output OUTPUT_FOLDER"
    }
    ATLASPATCH_SHARD(Channel.of(0..<(params.shards as int)))
}
