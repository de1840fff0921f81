<?php
	require_once dirname(__FILE__)."/config.php";
	require_once dirname(__FILE__)."/classes/ServiceSocket.class.php";
	$serviceSocket=new ServiceSocket($config["service_socket"]);
 ?>
